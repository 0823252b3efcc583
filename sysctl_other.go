//go:build !linux

package connlimit

// tcpMigrateReq: the setting is Linux's; elsewhere nothing is known.
func tcpMigrateReq() (on, known bool) { return false, false }
