package testkit

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"
)

// RedisError is an error reply of the server.
type RedisError string

func (e RedisError) Error() string { return string(e) }

// ErrNil is the reply to a missing key or field (a null bulk string).
var ErrNil = errors.New("testkit: redis nil")

// respConn is one RESP2 connection: enough for a test's own commands.
type respConn struct {
	c net.Conn
	r *bufio.Reader
}

func (r *Redis) dialAdmin() (*respConn, error) {
	d := net.Dialer{Timeout: time.Second}
	var c net.Conn
	var err error
	if r.Cfg.TLS {
		c, err = tls.DialWithDialer(&d, "tcp", r.Addr(), r.ClientTLS)
	} else {
		c, err = d.Dial("tcp", r.Addr())
	}
	if err != nil {
		return nil, err
	}
	rc := &respConn{c: c, r: bufio.NewReader(c)}
	var auth []any
	switch {
	case r.Cfg.Password != "":
		auth = []any{"AUTH", r.Cfg.Password}
	case r.Cfg.User != "":
		auth = []any{"AUTH", r.Cfg.User, r.Cfg.UserPassword}
	}
	if auth != nil {
		if _, err := rc.do(auth); err != nil {
			_ = c.Close()
			return nil, err
		}
	}
	return rc, nil
}

func (r *Redis) dropAdmin() {
	r.amu.Lock()
	defer r.amu.Unlock()
	if r.admin != nil {
		_ = r.admin.c.Close()
		r.admin = nil
	}
}

// Do sends one command to the server and returns its reply: a string, an
// int64, a []any, ErrNil for a null, or a RedisError for an error reply. A
// connection that fails is dialled again at the next call.
func (r *Redis) Do(args ...any) (any, error) {
	r.amu.Lock()
	defer r.amu.Unlock()
	if r.admin == nil {
		c, err := r.dialAdmin()
		if err != nil {
			return nil, err
		}
		r.admin = c
	}
	v, err := r.admin.do(args)
	var re RedisError
	if err != nil && !errors.As(err, &re) && !errors.Is(err, ErrNil) {
		_ = r.admin.c.Close()
		r.admin = nil
	}
	return v, err
}

// Int is Do for a command whose reply is an integer, or a number in a
// string (HGET of a count).
func (r *Redis) Int(args ...any) (int64, error) {
	v, err := r.Do(args...)
	if err != nil {
		return 0, err
	}
	switch v := v.(type) {
	case int64:
		return v, nil
	case string:
		return strconv.ParseInt(v, 10, 64)
	}
	return 0, fmt.Errorf("%v: not an integer reply: %v", args, v)
}

// Str is Do for a command whose reply is a string.
func (r *Redis) Str(args ...any) (string, error) {
	v, err := r.Do(args...)
	if err != nil {
		return "", err
	}
	s, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("%v: not a string reply: %v", args, v)
	}
	return s, nil
}

// Array is Do for a command whose reply is an array (HMGET).
func (r *Redis) Array(args ...any) ([]any, error) {
	v, err := r.Do(args...)
	if err != nil {
		return nil, err
	}
	a, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("%v: not an array reply: %v", args, v)
	}
	return a, nil
}

// Strings is Do for a command whose reply is an array of strings; a null
// element is "".
func (r *Redis) Strings(args ...any) ([]string, error) {
	a, err := r.Array(args...)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(a))
	for i, e := range a {
		out[i], _ = e.(string)
	}
	return out, nil
}

func (c *respConn) do(args []any) (any, error) {
	_ = c.c.SetDeadline(time.Now().Add(5 * time.Second))
	b := fmt.Appendf(nil, "*%d\r\n", len(args))
	for _, a := range args {
		s := fmt.Sprint(a)
		b = fmt.Appendf(b, "$%d\r\n%s\r\n", len(s), s)
	}
	if _, err := c.c.Write(b); err != nil {
		return nil, err
	}
	return c.read()
}

func (c *respConn) read() (any, error) {
	line, err := c.r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	if len(line) < 3 {
		return nil, fmt.Errorf("short reply %q", line)
	}
	kind, body := line[0], line[1:len(line)-2]
	switch kind {
	case '+':
		return body, nil
	case '-':
		return nil, RedisError(body)
	case ':':
		return strconv.ParseInt(body, 10, 64)
	case '$':
		n, err := strconv.Atoi(body)
		if err != nil {
			return nil, err
		}
		if n < 0 {
			return nil, ErrNil
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(c.r, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(body)
		if err != nil {
			return nil, err
		}
		if n < 0 {
			return nil, ErrNil
		}
		a := make([]any, n)
		for i := range a {
			if a[i], err = c.read(); err != nil && !errors.Is(err, ErrNil) {
				return nil, err
			}
		}
		return a, nil
	}
	return nil, fmt.Errorf("unknown reply %q", line)
}
