package main

// The head side: a 127.0.0.1 listener whose every connection becomes one TLS session to the
// worker's listener, checked to be the expected node, past the preamble.

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

// forwardTLS: the worker's certificate must chain to the cluster CA and name the expected node;
// its address is not what identifies it, so Go's host-name check is replaced by that one.
func forwardTLS(cfg *tls.Config, pool *x509.CertPool, expectID, remote string) *tls.Config {
	verified := &verifiedCerts{}
	cfg.RootCAs = pool
	cfg.ServerName, _, _ = net.SplitHostPort(remote) // as tls.Dial sets it: the session cache's key
	cfg.InsecureSkipVerify = true
	cfg.ClientSessionCache = tls.NewLRUClientSessionCache(16)
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("no worker certificate")
		}
		// the whole presented chain is the memo's key: the same bytes verify the same way
		var presented []byte
		for _, c := range cs.PeerCertificates {
			presented = append(presented, c.Raw...)
		}
		err := verified.check(presented, time.Now(), func() (window, error) {
			inter := x509.NewCertPool()
			for _, ic := range cs.PeerCertificates[1:] {
				inter.AddCert(ic)
			}
			opts := x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
			chains, err := cs.PeerCertificates[0].Verify(opts)
			if err != nil {
				return window{}, err
			}
			return chainWindow(chains[0]), nil
		})
		if err != nil {
			return err
		}
		peer, err := peerIdentity(cs.PeerCertificates[0])
		if err != nil {
			return err
		}
		if peer.role != "node" || (expectID != "" && peer.id != expectID) {
			return fmt.Errorf("tunnel peer is %s %s, expected node %s", peer.role, peer.id, expectID)
		}
		return nil
	}
	return cfg
}

// chainWindow: when every certificate of a verified chain is within its dates, so when
// x509.Verify's answer for it holds (the rest of what it checks does not change with time).
func chainWindow(chain []*x509.Certificate) window {
	w := window{from: chain[0].NotBefore, to: chain[0].NotAfter}
	for _, c := range chain[1:] {
		if c.NotBefore.After(w.from) {
			w.from = c.NotBefore
		}
		if c.NotAfter.Before(w.to) {
			w.to = c.NotAfter
		}
	}
	return w
}

type refused struct {
	msg     string
	pending bool
}

func (e refused) Error() string { return e.msg }

// dial opens one authenticated session to the worker, past the preamble.
func (r *relay) dial() (*tls.Conn, *recordConn, *bufio.Reader, error) {
	where := "tunnel to " + r.cfg.Remote
	raw, err := net.DialTimeout("tcp", r.cfg.Remote, 10*time.Second)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%s: %w", where, err)
	}
	rc := newRecordConn(raw)
	conn := tls.Client(rc, r.tlsCfg)
	fail := func(err error) (*tls.Conn, *recordConn, *bufio.Reader, error) {
		conn.Close()
		rc.release()
		return nil, nil, nil, err
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := conn.Handshake(); err != nil {
		return fail(fmt.Errorf("%s: %w", where, err))
	}
	fmt.Fprintf(conn, "{\"v\":1,\"port\":%d}\n", r.cfg.EnginePort)
	br := bufio.NewReader(conn) // the reply line; bulk reads of the session bypass it (records.go)
	line, err := readLine(br)
	var reply struct {
		Ok      bool   `json:"ok"`
		Error   string `json:"error"`
		Pending bool   `json:"pending"`
	}
	if err != nil || json.Unmarshal(line, &reply) != nil {
		return fail(fmt.Errorf("%s: malformed reply", where))
	}
	if !reply.Ok {
		return fail(refused{msg: where + " refused: " + reply.Error, pending: reply.Pending})
	}
	conn.SetDeadline(time.Time{})
	return conn, rc, br, nil
}

// serveHead: like the Node forwarder, dial again while the refusal is pending (50 ms doubling to
// 1 s, none after waitForEngineMs); any other failure closes the local connection.
func (r *relay) serveHead(local net.Conn) {
	defer local.Close()
	deadline := time.Now().Add(time.Duration(r.cfg.WaitForEngineMs) * time.Millisecond)
	var conn *tls.Conn
	var rc *recordConn
	var br *bufio.Reader
	for delay := 50 * time.Millisecond; ; delay *= 2 {
		if delay > time.Second {
			delay = time.Second
		}
		var err error
		conn, rc, br, err = r.dial()
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
	defer rc.release() // after the close below
	defer conn.Close()
	r.connections.Add(1)
	if conn.ConnectionState().DidResume {
		r.resumed.Add(1)
	}
	pipe(local, conn, rc, br, &r.toEngine, &r.fromEngine)
}

// report writes the counters whenever they moved, at most every 250 ms: the agent's
// orchard_rpc_bytes_total reads them from here.
func (r *relay) report() {
	if r.cfg.Mode == "listen" {
		last := map[sessionKey][3]int64{}
		for range time.Tick(250 * time.Millisecond) {
			r.emitSessionStats(last)
		}
	}
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

// emitCounters: every counter once more, moved or not (the final report).
func (r *relay) emitCounters() {
	if r.cfg.Mode == "listen" {
		r.emitSessionStats(map[sessionKey][3]int64{})
		return
	}
	r.emitCountersIfMoved([4]int64{-1})
}
