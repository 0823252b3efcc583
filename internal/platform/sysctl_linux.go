//go:build linux

package platform

import (
	"os"
	"strings"
)

// TCPMigrateReq reads net.ipv4.tcp_migrate_req (Linux 5.14 and later):
// whether the kernel moves the connections queued on a closing
// SO_REUSEPORT listener to another one on the same port, instead of
// resetting them. known is false where the setting does not exist.
func TCPMigrateReq() (on, known bool) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	if err != nil {
		return false, false
	}
	return strings.TrimSpace(string(b)) != "0", true
}
