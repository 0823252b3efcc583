//go:build !linux

package platform

import "syscall"

// CanWatch is false here: a waiting client that leaves is noticed only
// when the next handler reads from its connection after admission.
const CanWatch = false

// Watch is never called where CanWatch is false.
func Watch(syscall.RawConn, bool, bool) (bool, error) {
	panic("connlimit: Watch without platform support")
}

// Probe cannot tell here.
func Probe(syscall.RawConn, bool, bool) Peer { return PeerUnknown }
