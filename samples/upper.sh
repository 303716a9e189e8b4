#!/bin/sh
# An exec function: any executable works. Upper-cases its input.
tr '[:lower:]' '[:upper:]'
