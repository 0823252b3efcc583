//go:build !linux

package connlimit

import "syscall"

// canWatch is false here: a waiting client that leaves is noticed only
// when the next handler reads from its connection after admission.
const canWatch = false

func watchSocket(syscall.RawConn, bool, bool) (bool, error) {
	panic("connlimit: watchSocket without platform support")
}

func probe(syscall.RawConn, bool, bool) peer { return peerUnknown }
