// Package session is the client of the examples' demos: one HTTP request
// over a raw TCP connection through a limited layer4 route.
package session

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Run is one client: connect, ask, read the answer (then call answered
// with the time it took), keep the session for hold, and call left (if
// not nil) just before it closes.
func Run(addr string, hold time.Duration, answered func(time.Duration), left func()) error {
	t0 := time.Now()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: demo\r\n\r\n"); err != nil {
		return err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return fmt.Errorf("no answer: %v", err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("answer %s: %s", resp.Status, body)
	}
	answered(time.Since(t0))
	time.Sleep(hold)
	if left != nil {
		left()
	}
	return nil
}
