//go:build linux

package connlimit

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// canWatch reports whether this platform can watch a waiting socket for
// its client leaving without reading from it.
const canWatch = true

// watchSocket parks the calling goroutine in Go's network poller until the
// client of rc has gone (it returns true) or the connection's read deadline
// passes (it returns false and the deadline error). It never consumes a
// byte: the poller wakes it on every new segment, FIN or RST, and each time
// it looks at the socket with a zero-copy MSG_PEEK and, when bytes are
// pending, the TCP state.
func watchSocket(rc syscall.RawConn, keepHalfClosed, sentBefore bool) (gone bool, err error) {
	err = rc.Read(func(fd uintptr) bool {
		gone = peerGone(fd, keepHalfClosed, sentBefore)
		return gone
	})
	return gone, err
}

// socketGone looks at the socket once, without waiting.
func socketGone(rc syscall.RawConn, keepHalfClosed, sentBefore bool) bool {
	var gone bool
	if err := rc.Control(func(fd uintptr) { gone = peerGone(fd, keepHalfClosed, sentBefore) }); err != nil {
		return true
	}
	return gone
}

// socketUntouched reports whether the client is still connected and has
// not finished sending: nothing was read to its end. A handler that
// returns while this holds did not serve the connection.
func socketUntouched(rc syscall.RawConn) bool {
	untouched := false
	_ = rc.Control(func(fd uintptr) {
		n, errno := peek(fd)
		untouched = errno == unix.EAGAIN || (errno == 0 && n > 0 && tcpState(fd) == tcpEstablished)
	})
	return untouched
}

func peek(fd uintptr) (int, syscall.Errno) {
	var b [1]byte
	n, _, errno := syscall.Syscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1,
		uintptr(unix.MSG_PEEK|unix.MSG_DONTWAIT), 0, 0)
	return int(n), errno
}

// Linux TCP states (include/net/tcp_states.h).
const (
	tcpEstablished = 1
	tcpClose       = 7
	tcpCloseWait   = 8
)

func tcpState(fd uintptr) int {
	info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return -1 // not TCP (a Unix socket): unknown
	}
	return int(info.State)
}

// peerGone decides whether a waiting client has left:
//   - nothing pending and connected (EAGAIN): still there;
//   - an error such as ECONNRESET: gone;
//   - end of stream with nothing pending: gone, unless keepHalfClosed and
//     the client's bytes were read before (sentBefore): then it sent its
//     request and half-closed;
//   - bytes pending: gone if the connection was reset (state CLOSE), or if
//     the client closed its side (state CLOSE_WAIT) unless keepHalfClosed.
func peerGone(fd uintptr, keepHalfClosed, sentBefore bool) bool {
	n, errno := peek(fd)
	switch {
	case errno == unix.EAGAIN || errno == unix.EINTR:
		return false
	case errno != 0:
		return true
	case n == 0:
		return !(keepHalfClosed && sentBefore)
	}
	switch tcpState(fd) {
	case tcpClose:
		return true
	case tcpCloseWait:
		return !keepHalfClosed
	}
	return false
}
