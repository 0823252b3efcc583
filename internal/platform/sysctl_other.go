//go:build !linux

package platform

// TCPMigrateReq: the setting is Linux's; elsewhere nothing is known.
func TCPMigrateReq() (on, known bool) { return false, false }
