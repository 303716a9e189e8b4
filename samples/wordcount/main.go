// A Go function: reads the event from stdin, the context from FN_CONTEXT.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

type event struct {
	Text string `json:"text"`
}

type context struct {
	RequestID string `json:"request_id"`
}

func main() {
	var ev event
	if err := json.NewDecoder(os.Stdin).Decode(&ev); err != nil {
		fmt.Fprintln(os.Stderr, "bad event:", err)
		os.Exit(1)
	}
	var ctx context
	_ = json.Unmarshal([]byte(os.Getenv("FN_CONTEXT")), &ctx)
	out, _ := json.Marshal(map[string]any{
		"words":      len(strings.Fields(ev.Text)),
		"request_id": ctx.RequestID,
	})
	fmt.Println(string(out))
}
