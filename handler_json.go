package connlimit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// UnmarshalJSON decodes the handler's JSON as Caddy does (an unknown field
// is an error), and names wait_timeout when its value is bad:
// caddy.Duration's own errors (`time: invalid duration "soon"`) do not
// say which option they are about.
func (h *Handler) UnmarshalJSON(b []byte) error {
	type fields Handler
	type Handler fields // without this method; named so in encoding/json's errors
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	err := dec.Decode((*Handler)(h))
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	if err == nil || errors.As(err, &typeErr) || errors.As(err, &syntaxErr) ||
		strings.HasPrefix(err.Error(), "json: unknown field") {
		return err // encoding/json's own errors name the field
	}
	// An option's own decoder failed on its value; of the options only
	// wait_timeout (a caddy.Duration) has one.
	return fmt.Errorf("wait_timeout: %w", err)
}
