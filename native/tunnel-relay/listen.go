package main

// The worker side: TLS 1.3 from certificates of this cluster only, the role and revocation
// checked, then the preamble: an engine port this agent registered (spliced to 127.0.0.1) or a
// link probe (answered here). Every refusal is one reply line and a close; nothing is forwarded.
// The same contract as src/node/tunnel/listener.ts, the fallback.

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"
)

// Link probes (src/node/tunnel/link-probe.ts): the same bounds as the Node listener's.
const (
	maxProbeFrame   = 16 << 20
	maxProbeSession = 64 << 20
	probeSession    = 20 * time.Second
	preambleTimeout = 10 * time.Second
)

type sessionKey struct {
	peer string
	port int
}

type sessionStats struct{ toEngine, fromEngine, connections atomic.Int64 }

// admit tracks an authenticated session unless its peer is revoked, in one step, so a revocation
// either refuses the session or finds it to cut.
func (r *relay) admit(id string, raw net.Conn) (release func(), ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.revoked[id] {
		return nil, false
	}
	if r.byPeer[id] == nil {
		r.byPeer[id] = map[net.Conn]bool{}
	}
	r.byPeer[id][raw] = true
	return func() {
		r.mu.Lock()
		delete(r.byPeer[id], raw)
		if len(r.byPeer[id]) == 0 {
			delete(r.byPeer, id)
		}
		r.mu.Unlock()
	}, true
}

// engine: whether `port` is a registered engine, and the socket path it listens on ("" = TCP).
func (r *relay) engine(port int) (socket string, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	socket, ok = r.ports[port]
	return socket, ok
}

// dialEngine: the engine's Unix-domain socket when it has one (no TCP stack per byte), else its
// 127.0.0.1 port (MLX ring ranks).
func dialEngine(port int, socket string) (net.Conn, error) {
	if socket != "" {
		engine, err := net.Dial("unix", socket)
		if err == nil {
			unixBuffers(engine)
		}
		return engine, err
	}
	engine, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err == nil {
		engine.(*net.TCPConn).SetNoDelay(true)
	}
	return engine, err
}

func (r *relay) session(k sessionKey) *sessionStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.stats[k]
	if s == nil {
		s = &sessionStats{}
		r.stats[k] = s
	}
	return s
}

// authorize: the handshake checked the chain to the cluster CA on a full handshake; a resumed
// session carries the certificates from its ticket (Go before 1.21 keeps no verified chain, nor
// re-checks the dates), so what verifyCertificate checks is checked here on every session: issued
// by the CA itself, within its dates now, not a CA, one Orchard identity; then the role.
func authorize(cs tls.ConnectionState, ca *x509.Certificate, verified *verifiedCerts) (identity, string) {
	if len(cs.PeerCertificates) == 0 {
		return identity{}, "no client certificate"
	}
	leaf := cs.PeerCertificates[0]
	now := time.Now()
	signed := verified.check(leaf.Raw, now, func() (window, error) {
		// the CA's signature does not change with time: the dates are checked below, every session
		return window{from: time.Time{}, to: now.AddDate(1000, 0, 0)}, leaf.CheckSignatureFrom(ca)
	})
	if signed != nil || leaf.IsCA {
		return identity{}, "not issued by this cluster"
	}
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return identity{}, "certificate expired or not yet valid"
	}
	peer, err := peerIdentity(leaf)
	if err != nil {
		return identity{}, err.Error()
	}
	if peer.role != "node" && peer.role != "coordinator" {
		return peer, "role " + peer.role + " may not open tunnels"
	}
	return peer, ""
}

type request struct {
	V     int   `json:"v"`
	Port  *int  `json:"port"`
	Probe *bool `json:"probe"`
}

// parseRequest: exactly {"v":1,"port":N} or {"v":1,"probe":true}, as preamble.ts accepts.
func parseRequest(line []byte) (request, bool) {
	var req request
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if dec.Decode(&req) != nil || req.V != 1 || (req.Port == nil) == (req.Probe == nil) {
		return req, false
	}
	if req.Probe != nil {
		return req, *req.Probe
	}
	return req, *req.Port >= 1 && *req.Port <= 65535
}

func (r *relay) serveWorker(raw net.Conn) {
	rc := newRecordConn(raw)
	defer rc.release() // after the close below
	conn := tls.Server(rc, r.tlsCfg)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(preambleTimeout))
	if err := conn.Handshake(); err != nil {
		r.emit(map[string]string{"refused": "TLS handshake failed (no certificate of this cluster)"})
		return
	}
	peer, problem := authorize(conn.ConnectionState(), r.ca, &r.verified)
	refuse := func(msg string, pending bool) {
		reply := map[string]any{"ok": false, "error": msg}
		if pending {
			reply["pending"] = true
		}
		line, _ := json.Marshal(reply)
		conn.Write(append(line, '\n'))
		r.emit(map[string]string{"refused": msg, "peer": peer.id})
	}
	if problem != "" {
		refuse(problem, false)
		return
	}
	release, ok := r.admit(peer.id, raw)
	if !ok {
		refuse("this identity has been revoked", false)
		return
	}
	defer release()
	br := bufio.NewReader(conn) // the preamble and probes; bulk reads of the session bypass it (records.go)
	line, err := readLine(br)
	if err != nil {
		r.emit(map[string]string{"refused": "malformed preamble", "peer": peer.id})
		return
	}
	req, valid := parseRequest(line)
	if !valid {
		refuse("malformed preamble", false)
		return
	}
	if req.Probe != nil {
		conn.SetDeadline(time.Now().Add(probeSession))
		io.WriteString(conn, "{\"ok\":true}\n")
		serveProbe(conn, br)
		return
	}
	port := *req.Port
	socket, registered := r.engine(port)
	if !registered {
		refuse(fmt.Sprintf("port %d is not an engine of this node", port), true)
		return
	}
	engine, err := dialEngine(port, socket)
	if err != nil {
		refuse(fmt.Sprintf("engine on port %d is not accepting connections", port), true)
		return
	}
	s := r.session(sessionKey{peer.id, port})
	s.connections.Add(1)
	conn.SetDeadline(time.Time{})
	io.WriteString(conn, "{\"ok\":true}\n")
	pipe(engine, conn, rc, br, &s.fromEngine, &s.toEngine)
}

// serveProbe acknowledges each complete frame [u32 length][bytes] with its length until the peer
// closes or a bound is crossed (the caller's deadline bounds the session's time).
func serveProbe(conn net.Conn, br *bufio.Reader) {
	var header [4]byte
	total := 0
	for {
		if _, err := io.ReadFull(br, header[:]); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint32(header[:]))
		total += n
		if n < 1 || n > maxProbeFrame || total > maxProbeSession {
			return
		}
		if _, err := io.CopyN(io.Discard, br, int64(n)); err != nil {
			return
		}
		if _, err := conn.Write(header[:]); err != nil {
			return
		}
	}
}

// emitSessionStats reports each (peer, engine port) whose counters moved since `last`.
func (r *relay) emitSessionStats(last map[sessionKey][3]int64) {
	r.mu.Lock()
	now := make(map[sessionKey][3]int64, len(r.stats))
	for k, s := range r.stats {
		now[k] = [3]int64{s.toEngine.Load(), s.fromEngine.Load(), s.connections.Load()}
	}
	r.mu.Unlock()
	for k, v := range now {
		if last[k] != v {
			r.emit(map[string]any{"peer": k.peer, "enginePort": k.port, "toEngine": v[0], "fromEngine": v[1], "connections": v[2]})
			last[k] = v
		}
	}
}
