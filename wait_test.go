package connlimit

import (
	"net"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/platform"
	proxyproto "github.com/pires/go-proxyproto"
)

// How newStreamWait picks the way a waiter sleeps, for connections as the
// handler may get them.
func TestWaitModeOfWrappedStreams(t *testing.T) {
	if !platform.CanWatch {
		t.Skip("no socket watching on this platform: every stream waits on a channel")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	// A PROXY v2 header for a UDP ("DGRAM") client, over TCP.
	h := proxyproto.HeaderProxyFromAddrs(2,
		&net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1234},
		&net.UDPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 80})
	if _, err := h.WriteTo(client); err != nil {
		t.Fatal(err)
	}
	pp := proxyproto.NewConn(srv)
	_ = pp.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, ok := pp.RemoteAddr().(*net.UDPAddr); !ok { // reads the header
		t.Fatalf("PROXY remote address %T, want the header's UDP address", pp.RemoteAddr())
	}
	_ = pp.SetReadDeadline(time.Time{})

	for _, tc := range []struct {
		name           string
		conn           net.Conn
		keepHalfClosed bool
		onSocket       bool
	}{
		{"bare TCP", srv, false, true},
		{"TCP behind a PROXY v2 header naming UDP addresses", pp, false, true},
		{"same, keep_half_closed (the wrapper may hold bytes)", pp, true, false},
		{"behind release close_write", &closeWriteFrees{Conn: srv}, true, true},
		{"behind two", &closeWriteFrees{Conn: &closeWriteFrees{Conn: srv}}, true, true},
	} {
		if isPacketFlow(tc.conn) {
			t.Errorf("%s: taken for a UDP flow", tc.name)
		}
		s := newStreamWait(tc.conn, tc.keepHalfClosed, false)
		if onSocket := s.raw != nil; onSocket != tc.onSocket {
			t.Errorf("%s: waits on the socket %v, want %v (else on a channel)", tc.name, onSocket, tc.onSocket)
		}
		s.done()
	}
}

// A held datagram larger than the reader's buffer is read in parts, as
// caddy-l4's own flows do, not cut short.
func TestReplayConnKeepsTheRestOfALargeDatagram(t *testing.T) {
	big := make([]byte, 9000)
	for i := range big {
		big[i] = byte(i)
	}
	rc := &replayConn{held: [][]byte{big, []byte("next")}}
	buf := make([]byte, 8192)
	var got []byte
	for _, want := range []int{8192, 808, 4} {
		n, err := rc.Read(buf)
		if err != nil || n != want {
			t.Fatalf("read %d bytes (err %v), want %d", n, err, want)
		}
		got = append(got, buf[:n]...)
	}
	if string(got[:9000]) != string(big) || string(got[9000:]) != "next" {
		t.Fatal("replayed bytes differ from the held datagrams")
	}
}
