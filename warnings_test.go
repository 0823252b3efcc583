package connlimit

import (
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// The reload warning is logged once per process, and only where the
// kernel would reset connections queued on a replaced listener.
func TestReloadLossWarnedOncePerProcess(t *testing.T) {
	saved := readMigrateReq
	defer func() { readMigrateReq, reloadLoss = saved, sync.Once{} }()
	for _, tc := range []struct {
		name      string
		on, known bool
		want      int
	}{
		{"tcp_migrate_req 0", false, true, 1},
		{"tcp_migrate_req 1", true, true, 0},
		{"no such setting", false, false, 0},
	} {
		readMigrateReq = func() (bool, bool) { return tc.on, tc.known }
		reloadLoss = sync.Once{}
		core, logs := observer.New(zap.InfoLevel)
		for _, zone := range []string{"a", "b", "a"} { // three handlers provisioned, or reloads
			h := &Handler{Zone: zone, logger: zap.New(core)}
			h.warnReloadLoss()
		}
		if got := logs.Len(); got != tc.want {
			t.Errorf("%s: %d warnings, want %d", tc.name, got, tc.want)
		}
		for _, e := range logs.All() {
			if !strings.Contains(e.Message, "net.ipv4.tcp_migrate_req") || !strings.Contains(e.Message, "=1") {
				t.Errorf("%s: warning %q does not say what to set", tc.name, e.Message)
			}
		}
	}
}
