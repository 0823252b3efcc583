//go:build linux

package platform

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// CanWatch reports whether this platform can watch a waiting socket for
// its client leaving without reading from it.
const CanWatch = true

// Watch parks the calling goroutine in Go's network poller until the
// client of rc has gone (it returns true) or the connection's read deadline
// passes (it returns false and the deadline error). It never consumes a
// byte: the poller wakes it on every new segment, FIN or RST, and each time
// it asks the socket's state with one non-blocking ppoll for POLLRDHUP.
func Watch(rc syscall.RawConn, keepHalfClosed, sentBefore bool) (gone bool, err error) {
	err = rc.Read(func(fd uintptr) bool {
		gone = peerState(fd, keepHalfClosed, sentBefore) == PeerGone
		return gone
	})
	return gone, err
}

// Probe looks at the socket once, without waiting. A socket that can no
// longer be looked at (closed under us) is gone.
func Probe(rc syscall.RawConn, keepHalfClosed, sentBefore bool) Peer {
	p := PeerUnknown
	if err := rc.Control(func(fd uintptr) { p = peerState(fd, keepHalfClosed, sentBefore) }); err != nil {
		return PeerGone
	}
	return p
}

// peerState decides whether a client is still there:
//   - reset, or both sides closed (POLLHUP, POLLERR): gone;
//   - connected, and not closed its side (no POLLRDHUP): there;
//   - closed its sending side (FIN): gone, unless keepHalfClosed and the
//     client sent bytes first (read by caddy-l4's matchers, sentBefore, or
//     still pending in the socket): then it half-closed after its request.
func peerState(fd uintptr, keepHalfClosed, sentBefore bool) Peer {
	ev, ok := pollState(fd)
	switch {
	case !ok:
		return PeerUnknown // interrupted: looked at again on the next wake-up
	case ev&(unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0:
		return PeerGone
	case ev&unix.POLLRDHUP == 0:
		return PeerThere
	case !keepHalfClosed || (!sentBefore && !peek(fd)):
		return PeerGone
	}
	return PeerThere
}

// pollState returns the socket's poll events without waiting: POLLRDHUP
// once the peer has sent its FIN (even with bytes still pending), POLLHUP
// and POLLERR once it reset or both sides closed. One system call, no
// allocation; ok is false if it was interrupted.
func pollState(fd uintptr) (revents int16, ok bool) {
	pfd := unix.PollFd{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}
	var now unix.Timespec // zero: do not wait
	_, _, errno := syscall.Syscall6(unix.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1,
		uintptr(unsafe.Pointer(&now)), 0, 0, 0)
	return pfd.Revents, errno == 0
}

// peek reports whether a byte is pending, without consuming it.
func peek(fd uintptr) bool {
	var b [1]byte
	n, _, errno := syscall.Syscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1,
		uintptr(unix.MSG_PEEK|unix.MSG_DONTWAIT), 0, 0)
	return errno == 0 && n > 0
}
