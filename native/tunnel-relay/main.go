// orchard-tunnel-relay: one end of the agents' engine tunnel in native code. Wire-compatible with
// src/node/tunnel (TLS 1.3 only, both ends present cluster certificates, identity from the
// `orchard://<role>/<id>` URI SAN, one JSON preamble line each way, then engine bytes), so either
// end can face a Node end. It keeps the agents' checks (role, expected id, revocation, registered
// engine ports only), which stunnel cannot express, at native cost (bench/README.md, bench:tunnel).
// `forward` (the head side) is what the agent runs (src/node/tunnel/native-forwarder.ts);
// `listen` (the worker side) is measured by the benches but not yet wired into the agent.
//
// Configured by one JSON line on stdin (keys never on argv), answers {"port":N} on stdout, then
// (forward) counters and errors as JSON lines; further stdin lines {"revoke":"id"} cut that peer's
// sessions and refuse it from then on (listen). Exits when stdin ends: never outlives its agent.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type config struct {
	Mode       string `json:"mode"` // "listen" (worker end) or "forward" (head end)
	Listen     string `json:"listen"`
	Remote     string `json:"remote"`     // forward: the worker's listener
	EnginePort int    `json:"enginePort"` // forward: the engine port to ask for
	ExpectID   string `json:"expectId"`   // forward: the worker's node id
	// forward: how long to keep dialling while the worker answers that the engine is not up yet
	WaitForEngineMs int    `json:"waitForEngineMs"`
	EnginePorts     []int  `json:"enginePorts"` // listen: the engines this agent registered
	CertPem         string `json:"certPem"`
	KeyPem          string `json:"keyPem"`
	CaPem           string `json:"caPem"`
}

const maxLine = 256

type identity struct{ role, id string }

func peerIdentity(cert *x509.Certificate) (identity, error) {
	if len(cert.URIs) != 1 || cert.URIs[0].Scheme != "orchard" {
		return identity{}, errors.New("no orchard identity URI")
	}
	u := cert.URIs[0]
	id := strings.TrimPrefix(u.Path, "/")
	if u.Host == "" || id == "" || strings.Contains(id, "/") {
		return identity{}, errors.New("malformed orchard identity URI")
	}
	return identity{role: u.Host, id: id}, nil
}

type relay struct {
	cfg   config
	out   *json.Encoder // stdout: the port, then counters and errors, one JSON line each
	outMu sync.Mutex
	// payload bytes (plaintext side) and sessions, all connections; forward mode reports them
	toEngine, fromEngine, connections, resumed atomic.Int64
	tlsCfg                                     *tls.Config
	mu                                         sync.Mutex
	revoked                                    map[string]bool
	byPeer                                     map[string]map[net.Conn]bool
}

func (r *relay) track(id string, c net.Conn) func() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.byPeer[id] == nil {
		r.byPeer[id] = map[net.Conn]bool{}
	}
	r.byPeer[id][c] = true
	return func() {
		r.mu.Lock()
		delete(r.byPeer[id], c)
		r.mu.Unlock()
	}
}

func (r *relay) isRevoked(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.revoked[id]
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

type counted struct {
	io.Reader
	n *atomic.Int64
}

func (c counted) Read(p []byte) (int, error) {
	n, err := c.Reader.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// pipe copies both ways (aR is what a reads, bR what b reads: buffered past the preamble); one
// side's EOF half-closes the other, an error closes both.
func pipe(a net.Conn, aR io.Reader, b net.Conn, bR io.Reader) {
	var wg sync.WaitGroup
	one := func(dst net.Conn, src io.Reader) {
		defer wg.Done()
		if _, err := io.CopyBuffer(dst, src, make([]byte, 256<<10)); err != nil {
			a.Close()
			b.Close()
			return
		}
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
	}
	wg.Add(2)
	go one(b, aR)
	go one(a, bR)
	wg.Wait()
	a.Close()
	b.Close()
}

func (r *relay) serveWorker(raw net.Conn) {
	conn := tls.Server(raw, r.tlsCfg)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := conn.Handshake(); err != nil {
		return
	}
	peer, err := peerIdentity(conn.ConnectionState().PeerCertificates[0])
	refuse := func(msg string) { fmt.Fprintf(conn, "{\"ok\":false,\"error\":%q}\n", msg) }
	if err != nil {
		refuse(err.Error())
		return
	}
	if peer.role != "node" && peer.role != "coordinator" {
		refuse("role " + peer.role + " may not open tunnels")
		return
	}
	if r.isRevoked(peer.id) {
		refuse("this identity has been revoked")
		return
	}
	defer r.track(peer.id, conn)()
	br := bufio.NewReaderSize(conn, 64<<10)
	line, err := readLine(br)
	var req struct {
		V    int `json:"v"`
		Port int `json:"port"`
	}
	if err != nil || json.Unmarshal(line, &req) != nil || req.V != 1 {
		refuse("malformed preamble")
		return
	}
	allowed := false
	for _, p := range r.cfg.EnginePorts {
		allowed = allowed || p == req.Port
	}
	if !allowed {
		refuse(fmt.Sprintf("port %d is not an engine of this node", req.Port))
		return
	}
	engine, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", req.Port))
	if err != nil {
		refuse("engine is not accepting connections")
		return
	}
	conn.SetDeadline(time.Time{})
	io.WriteString(conn, "{\"ok\":true}\n")
	pipe(conn, br, engine, engine)
}

type refused struct {
	msg     string
	pending bool
}

func (e refused) Error() string { return e.msg }

// dial opens one authenticated session to the worker, past the preamble.
func (r *relay) dial() (*tls.Conn, *bufio.Reader, error) {
	where := "tunnel to " + r.cfg.Remote
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", r.cfg.Remote, r.tlsCfg)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", where, err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "{\"v\":1,\"port\":%d}\n", r.cfg.EnginePort)
	br := bufio.NewReaderSize(conn, 64<<10)
	line, err := readLine(br)
	var reply struct {
		Ok      bool   `json:"ok"`
		Error   string `json:"error"`
		Pending bool   `json:"pending"`
	}
	if err != nil || json.Unmarshal(line, &reply) != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("%s: malformed reply", where)
	}
	if !reply.Ok {
		conn.Close()
		return nil, nil, refused{msg: where + " refused: " + reply.Error, pending: reply.Pending}
	}
	conn.SetDeadline(time.Time{})
	return conn, br, nil
}

// serveHead: like the Node forwarder, dial again while the refusal is pending (50 ms doubling to
// 1 s, none after waitForEngineMs); any other failure closes the local connection.
func (r *relay) serveHead(local net.Conn) {
	defer local.Close()
	deadline := time.Now().Add(time.Duration(r.cfg.WaitForEngineMs) * time.Millisecond)
	var conn *tls.Conn
	var br *bufio.Reader
	for delay := 50 * time.Millisecond; ; delay *= 2 {
		if delay > time.Second {
			delay = time.Second
		}
		var err error
		conn, br, err = r.dial()
		if err == nil {
			break
		}
		var ref refused
		if !errors.As(err, &ref) || !ref.pending || time.Now().Add(delay).After(deadline) {
			r.emit(map[string]string{"error": err.Error()})
			return
		}
		time.Sleep(delay)
	}
	defer conn.Close()
	r.connections.Add(1)
	if conn.ConnectionState().DidResume {
		r.resumed.Add(1)
	}
	pipe(local, counted{local, &r.toEngine}, conn, counted{br, &r.fromEngine})
}

// report writes the counters whenever they moved, at most every 250 ms: the agent's
// orchard_rpc_bytes_total reads them from here.
func (r *relay) report() {
	last := [4]int64{-1}
	for range time.Tick(250 * time.Millisecond) {
		last = r.emitCountersIfMoved(last)
	}
}

func (r *relay) counters() [4]int64 {
	return [4]int64{r.toEngine.Load(), r.fromEngine.Load(), r.connections.Load(), r.resumed.Load()}
}

func (r *relay) emitCountersIfMoved(last [4]int64) [4]int64 {
	now := r.counters()
	if now != last {
		r.emit(map[string]int64{"toEngine": now[0], "fromEngine": now[1], "connections": now[2], "resumed": now[3]})
	}
	return now
}

func (r *relay) emitCounters() { r.emitCountersIfMoved([4]int64{-1}) }

func tlsConfig(c config) (*tls.Config, error) {
	pair, err := tls.X509KeyPair([]byte(c.CertPem), []byte(c.KeyPem))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(c.CaPem)) {
		return nil, errors.New("no CA certificate")
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS13, MaxVersion: tls.VersionTLS13}
	if c.Mode == "listen" {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = pool
		return cfg, nil
	}
	// the worker's certificate must chain to the cluster CA and name the expected node; its
	// address is not what identifies it, so Go's host-name check is replaced by that one
	cfg.RootCAs = pool
	cfg.InsecureSkipVerify = true
	cfg.ClientSessionCache = tls.NewLRUClientSessionCache(16)
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("no worker certificate")
		}
		inter := x509.NewCertPool()
		for _, ic := range cs.PeerCertificates[1:] {
			inter.AddCert(ic)
		}
		opts := x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
		if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
			return err
		}
		peer, err := peerIdentity(cs.PeerCertificates[0])
		if err != nil {
			return err
		}
		if peer.role != "node" || (c.ExpectID != "" && peer.id != c.ExpectID) {
			return fmt.Errorf("tunnel peer is %s %s, expected node %s", peer.role, peer.id, c.ExpectID)
		}
		return nil
	}
	return cfg, nil
}

func main() {
	in := bufio.NewReader(os.Stdin)
	first, err := in.ReadBytes('\n')
	var c config
	if err != nil || json.Unmarshal(first, &c) != nil {
		fmt.Fprintln(os.Stderr, "tunnel-relay: expected one JSON config line on stdin")
		os.Exit(2)
	}
	tlsCfg, err := tlsConfig(c)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tunnel-relay:", err)
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", c.Listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tunnel-relay:", err)
		os.Exit(2)
	}
	r := &relay{cfg: c, tlsCfg: tlsCfg, out: json.NewEncoder(os.Stdout), revoked: map[string]bool{}, byPeer: map[string]map[net.Conn]bool{}}
	r.emit(map[string]int{"port": ln.Addr().(*net.TCPAddr).Port})
	if c.Mode == "forward" {
		go r.report()
	}
	go func() {
		// stdin's end is the supervisor's end: exit with it
		for {
			line, err := in.ReadBytes('\n')
			if err != nil {
				if c.Mode == "forward" {
					r.emitCounters() // the final totals, so the agent's byte counters end exact
				}
				os.Exit(0)
			}
			var cmd struct {
				Revoke string `json:"revoke"`
			}
			if json.Unmarshal(line, &cmd) == nil && cmd.Revoke != "" {
				r.mu.Lock()
				r.revoked[cmd.Revoke] = true
				for conn := range r.byPeer[cmd.Revoke] {
					conn.Close()
				}
				r.mu.Unlock()
			}
		}
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			continue
		}
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		if c.Mode == "listen" {
			go r.serveWorker(conn)
		} else {
			go r.serveHead(conn)
		}
	}
}
