// orchard-tunnel-relay: one end of the agents' engine tunnel in native code. Wire-compatible with
// src/node/tunnel (TLS 1.3 only, both ends present cluster certificates, identity from the
// `orchard://<role>/<id>` URI SAN, one JSON preamble line each way, then engine bytes), so either
// end can face a Node end. It keeps the agents' checks (role, expected id, revocation, registered
// engine ports only), which stunnel cannot express, at native cost (bench/README.md, bench:tunnel).
// `forward` (forward.go) is the head side (src/node/tunnel/native-forwarder.ts); `listen`
// (listen.go) is the worker side (src/node/tunnel/native-listener.ts). Both are what the agent runs.
//
// Configured by one JSON line on stdin (keys never on argv), answers {"port":N} on stdout, then
// counters and errors as JSON lines. Further stdin lines are commands (listen mode, commands.go).
// Exits when stdin ends: never outlives its agent.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
)

type config struct {
	Mode       string `json:"mode"` // "listen" (worker end) or "forward" (head end)
	Listen     string `json:"listen"`
	Remote     string `json:"remote"`     // forward: the worker's listener
	EnginePort int    `json:"enginePort"` // forward: the engine port to ask for
	ExpectID   string `json:"expectId"`   // forward: the worker's node id
	// forward: how long to keep dialling while the worker answers that the engine is not up yet
	WaitForEngineMs int `json:"waitForEngineMs"`
	// listen: the engines this agent registered, and the peers revoked, when it starts (later
	// changes arrive as commands)
	EnginePorts []int `json:"enginePorts"`
	// listen: the engines among them that listen on a Unix-domain socket (rpc-servers), by port:
	// the socket path the session dials instead of 127.0.0.1:<port>
	EngineSockets map[int]string `json:"engineSockets"`
	Revoked       []string       `json:"revoked"`
	CertPem       string         `json:"certPem"`
	KeyPem        string         `json:"keyPem"`
	CaPem         string         `json:"caPem"`
}

const maxLine = 256

type identity struct{ role, id string }

// unixSocketBuffer: a Unix stream socket's buffers start small (~208 KiB on Linux, 8 KiB on
// macOS) and, unlike loopback TCP's, never grow, so a weight upload would wake the relay and the
// engine every few hundred KiB; as large as loopback TCP autotunes to (the kernel caps it).
const unixSocketBuffer = 4 << 20

func unixBuffers(c net.Conn) {
	if uc, ok := c.(*net.UnixConn); ok {
		uc.SetWriteBuffer(unixSocketBuffer)
		uc.SetReadBuffer(unixSocketBuffer)
	}
}

// listen: `unix:<path>` (forward mode: the head engine's side, a socket in the agent's private
// directory; a stale socket file there is replaced) or a TCP address. The port it reports is 0
// for a socket.
func listen(addr string) (net.Listener, int, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if st, err := os.Lstat(path); err == nil {
			if st.Mode()&os.ModeSocket == 0 {
				return nil, 0, fmt.Errorf("%s exists and is not a socket", path)
			}
			os.Remove(path)
		}
		ln, err := net.Listen("unix", path)
		return ln, 0, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, 0, err
	}
	return ln, ln.Addr().(*net.TCPAddr).Port, nil
}

// src/shared/pki/identity.ts: the roles and the id alphabet a cluster certificate may name
var (
	roles = map[string]bool{"node": true, "coordinator": true, "admin": true, "nats": true}
	idRe  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
)

// peerIdentity: exactly one SAN, the URI orchard://<role>/<id>, as verifyCertificate reads it.
func peerIdentity(cert *x509.Certificate) (identity, error) {
	if len(cert.URIs) != 1 || len(cert.DNSNames)+len(cert.EmailAddresses)+len(cert.IPAddresses) != 0 {
		return identity{}, errors.New("certificate carries no single Orchard identity")
	}
	u := cert.URIs[0]
	id := ""
	if len(u.Path) > 1 {
		id = u.Path[1:]
	}
	if u.Scheme != "orchard" || !roles[u.Host] || !idRe.MatchString(id) || u.String() != "orchard://"+u.Host+"/"+id {
		return identity{}, errors.New("certificate carries no single Orchard identity")
	}
	return identity{role: u.Host, id: id}, nil
}

type relay struct {
	cfg    config
	out    *json.Encoder // stdout: the port, then counters and errors, one JSON line each
	outMu  sync.Mutex
	tlsCfg *tls.Config
	ca     *x509.Certificate // the cluster CA (listen: what a peer's certificate must be issued by)
	// listen: certificates whose CA signature was checked already (verified.go)
	verified verifiedCerts
	// forward: payload bytes (plaintext side) and sessions, all connections
	toEngine, fromEngine, connections, resumed atomic.Int64
	// listen: its state, changed by commands (commands.go)
	mu      sync.Mutex
	ports   map[int]string // registered engine port → its socket path, "" = 127.0.0.1:<port>
	revoked map[string]bool
	byPeer  map[string]map[net.Conn]bool
	stats   map[sessionKey]*sessionStats
}

func readLine(br *bufio.Reader) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if err != nil || len(line) > maxLine {
		return nil, errors.New("bad preamble line")
	}
	return line, nil
}

func (r *relay) emit(v any) {
	r.outMu.Lock()
	defer r.outMu.Unlock()
	r.out.Encode(v)
}

func tlsConfig(c config) (*tls.Config, *x509.Certificate, error) {
	pair, err := tls.X509KeyPair([]byte(c.CertPem), []byte(c.KeyPem))
	if err != nil {
		return nil, nil, err
	}
	block, _ := pem.Decode([]byte(c.CaPem))
	if block == nil {
		return nil, nil, errors.New("no CA certificate")
	}
	ca, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	// full-size records from the first byte: the records are batched per write anyway (records.go)
	cfg := &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS13, MaxVersion: tls.VersionTLS13, DynamicRecordSizingDisabled: true}
	if c.Mode == "listen" {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = pool
		return cfg, ca, nil
	}
	return forwardTLS(cfg, pool, c.ExpectID, c.Remote), ca, nil
}

func main() {
	stopProfile := startProfile()
	in := bufio.NewReader(os.Stdin)
	first, err := in.ReadBytes('\n')
	var c config
	if err != nil || json.Unmarshal(first, &c) != nil || (c.Mode != "listen" && c.Mode != "forward") {
		fmt.Fprintln(os.Stderr, "tunnel-relay: expected one JSON config line on stdin")
		os.Exit(2)
	}
	tlsCfg, ca, err := tlsConfig(c)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tunnel-relay:", err)
		os.Exit(2)
	}
	ln, port, err := listen(c.Listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tunnel-relay:", err)
		os.Exit(2)
	}
	r := &relay{cfg: c, tlsCfg: tlsCfg, ca: ca, out: json.NewEncoder(os.Stdout), ports: map[int]string{}, revoked: map[string]bool{}, byPeer: map[string]map[net.Conn]bool{}, stats: map[sessionKey]*sessionStats{}}
	for _, p := range c.EnginePorts {
		r.ports[p] = c.EngineSockets[p]
	}
	for _, id := range c.Revoked {
		r.revoked[id] = true
	}
	r.emit(map[string]int{"port": port})
	go r.report()
	// stdin's end is the supervisor's end: the final totals (so the agent's byte counters end
	// exact), then exit
	go func() {
		r.commands(in)
		r.emitCounters()
		stopProfile()
		os.Exit(0)
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			continue
		}
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		unixBuffers(conn)
		if c.Mode == "listen" {
			go r.serveWorker(conn)
		} else {
			go r.serveHead(conn)
		}
	}
}
