package connlimit

// The platform layer: how a waiting socket is watched for its client
// leaving, without reading from it (watch_linux.go; elsewhere nothing can
// be told, watch_other.go). It knows sockets, nothing of zones or Caddy.

// peer is what one look at a socket tells of its client.
type peer uint8

const (
	// peerUnknown: the platform cannot tell, or the look was interrupted.
	peerUnknown peer = iota
	// peerThere: connected, and has not finished sending.
	peerThere
	// peerGone: reset, closed, or (unless kept) half-closed.
	peerGone
)
