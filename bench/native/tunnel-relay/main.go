// tunnel-relay: a native prototype of one end of the agents' engine tunnel, for bench:tunnel and
// bench:tunnel-relays. Wire-compatible with src/node/tunnel (TLS 1.3 only, both ends present
// cluster certificates, identity from the `orchard://<role>/<id>` URI SAN, one JSON preamble line
// each way, then engine bytes), so either end can face a Node end. What it proves: a native relay
// can keep the agents' checks (role, expected id, revocation, registered engine ports only) that
// stunnel cannot express, at native cost. Not wired into the agent (see bench/README.md).
//
// Configured by one JSON line on stdin (keys never on argv), answers {"port":N} on stdout;
// further stdin lines {"revoke":"id"} cut that peer's sessions and refuse it from then on.
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
	"time"
)

type config struct {
	Mode        string `json:"mode"` // "listen" (worker end) or "forward" (head end)
	Listen      string `json:"listen"`
	Remote      string `json:"remote"`      // forward: the worker's listener
	EnginePort  int    `json:"enginePort"`  // forward: the engine port to ask for
	ExpectID    string `json:"expectId"`    // forward: the worker's node id
	EnginePorts []int  `json:"enginePorts"` // listen: the engines this agent registered
	CertPem     string `json:"certPem"`
	KeyPem      string `json:"keyPem"`
	CaPem       string `json:"caPem"`
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
	cfg     config
	tlsCfg  *tls.Config
	mu      sync.Mutex
	revoked map[string]bool
	byPeer  map[string]map[net.Conn]bool
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

func (r *relay) serveHead(local net.Conn) {
	defer local.Close()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", r.cfg.Remote, r.tlsCfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tunnel-relay:", err)
		return
	}
	defer conn.Close()
	fmt.Fprintf(conn, "{\"v\":1,\"port\":%d}\n", r.cfg.EnginePort)
	br := bufio.NewReaderSize(conn, 64<<10)
	line, err := readLine(br)
	var reply struct {
		Ok    bool   `json:"ok"`
		Error string `json:"error"`
	}
	if err != nil || json.Unmarshal(line, &reply) != nil || !reply.Ok {
		fmt.Fprintln(os.Stderr, "tunnel-relay: refused:", reply.Error)
		return
	}
	pipe(local, local, conn, br)
}

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
	r := &relay{cfg: c, tlsCfg: tlsCfg, revoked: map[string]bool{}, byPeer: map[string]map[net.Conn]bool{}}
	fmt.Printf("{\"port\":%d}\n", ln.Addr().(*net.TCPAddr).Port)
	go func() {
		// stdin's end is the supervisor's end: exit with it
		for {
			line, err := in.ReadBytes('\n')
			if err != nil {
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
