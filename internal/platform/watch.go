// Package platform is how a waiting socket is watched for its client
// leaving, without reading from it (watch_linux.go; elsewhere nothing can
// be told, watch_other.go), and the kernel settings the handler checks. It
// knows sockets, nothing of zones or Caddy.
package platform

// Peer is what one look at a socket tells of its client.
type Peer uint8

const (
	// PeerUnknown: the platform cannot tell, or the look was interrupted.
	PeerUnknown Peer = iota
	// PeerThere: connected, and has not finished sending.
	PeerThere
	// PeerGone: reset, closed, or (unless kept) half-closed.
	PeerGone
)
