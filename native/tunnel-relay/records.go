package main

// Fewer system calls and wake-ups per byte on the TLS side of a tunnel (bench/README.md,
// bench:tunnel): Go's tls.Conn writes every 16 KiB record with its own write(2) and returns one
// record per Read, so a 256 KiB chunk cost its sender 16 writes and its receiver 16 reads and 16
// writes, each write a wake-up of the next process on the same two cores as the engines.
// recordConn sits under the tls.Conn (nothing above it changes: same records, same keys, same
// checks): one tls.Conn.Write leaves as one write(2), and reads are buffered 256 KiB at a time
// but handed to TLS one record at a time, so the relay can tell that the next record is already
// here and decrypt it before writing the plaintext (openRecords), without ever waiting for it.

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

const (
	recordHeader = 5 // type, version, length (RFC 8446 5.1)
	maxPlaintext = 16 << 10
	chunk        = 256 << 10
)

// chunks: the sessions' buffers, reused. A model load opens a dozen sessions; with fresh buffers
// for each, garbage collection and its scheduler wake-ups were most of a session's setup CPU.
var chunks = sync.Pool{New: func() any { b := make([]byte, chunk+4<<10); return &b }}

type recordConn struct {
	net.Conn
	in, out *[]byte // from chunks, until release
	r, w    int     // (*in)[r:w]: received, not yet handed to TLS
	left    int     // bytes of the current record not yet handed to TLS
	// writes: appended to out while batching, so a whole tls.Conn.Write goes out as one write(2)
	mu       sync.Mutex
	batching bool
}

func newRecordConn(raw net.Conn) *recordConn {
	in, out := chunks.Get().(*[]byte), chunks.Get().(*[]byte)
	*in, *out = (*in)[:cap(*in)], (*out)[:0]
	return &recordConn{Conn: raw, in: in, out: out}
}

// release returns the buffers once the session is closed and its copies have ended.
func (c *recordConn) release() {
	chunks.Put(c.in)
	chunks.Put(c.out)
	c.in, c.out = nil, nil
}

// fill reads what the socket has, after the bytes still buffered (fewer than a header when called).
func (c *recordConn) fill() error {
	buf := *c.in
	c.w = copy(buf, buf[c.r:c.w])
	c.r = 0
	n, err := c.Conn.Read(buf[c.w:])
	c.w += n
	if n > 0 {
		return nil
	}
	return err
}

// Read hands TLS at most the rest of the current record, so nothing past it hides in TLS's own
// buffer and recordBuffered sees every byte not yet decrypted.
func (c *recordConn) Read(p []byte) (int, error) {
	if c.left == 0 {
		for c.w-c.r < recordHeader {
			if err := c.fill(); err != nil {
				return 0, err // an unfinished header stays buffered; TLS reports the error
			}
		}
		c.left = recordHeader + int(binary.BigEndian.Uint16((*c.in)[c.r+3:]))
	}
	if c.r == c.w {
		if err := c.fill(); err != nil {
			return 0, err
		}
	}
	if len(p) > c.left {
		p = p[:c.left]
	}
	n := copy(p, (*c.in)[c.r:c.w])
	c.r += n
	c.left -= n
	return n, nil
}

// recordBuffered: the next record is here in full, so TLS can open it without a system call.
func (c *recordConn) recordBuffered() bool {
	have := c.w - c.r
	return c.left == 0 && have >= recordHeader && have >= recordHeader+int(binary.BigEndian.Uint16((*c.in)[c.r+3:]))
}

func (c *recordConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.batching {
		*c.out = append(*c.out, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// sealRecords: one tls.Conn.Write, all its records in one write(2). A record TLS writes from
// another goroutine meanwhile (a KeyUpdate answer) joins the batch in order.
func (c *recordConn) sealRecords(t *tls.Conn, p []byte) error {
	c.mu.Lock()
	c.batching = true
	c.mu.Unlock()
	_, err := t.Write(p)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.batching = false
	out := *c.out
	*c.out = out[:0]
	if err != nil {
		return err
	}
	_, err = c.Conn.Write(out)
	return err
}

// sealTo copies plain → TLS, counting plaintext bytes, until src ends (nil) or fails.
func sealTo(c *recordConn, t *tls.Conn, src io.Reader, count *atomic.Int64) error {
	b := chunks.Get().(*[]byte)
	defer chunks.Put(b)
	buf := (*b)[:chunk]
	for {
		n, err := src.Read(buf)
		if n > 0 {
			count.Add(int64(n))
			if werr := c.sealRecords(t, buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// openTo copies TLS → plain, counting plaintext bytes: each write carries every record that had
// arrived, not one record. tr is the session's reader past the preamble (its buffer first).
func openTo(c *recordConn, t *tls.Conn, tr *bufio.Reader, dst io.Writer, count *atomic.Int64) error {
	b := chunks.Get().(*[]byte)
	defer chunks.Put(b)
	buf := (*b)[:chunk]
	for {
		n, err := tr.Read(buf)
		n, err = openBuffered(c, t, tr, buf, n, err)
		if n > 0 {
			count.Add(int64(n))
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// openBuffered appends to buf[:n] the records already buffered. A record may hold no data (a
// post-handshake message), after which TLS would wait for the next: the read deadline in the past
// turns that wait into an immediate timeout, so a batch never waits for bytes not yet sent.
func openBuffered(c *recordConn, t *tls.Conn, tr *bufio.Reader, buf []byte, n int, err error) (int, error) {
	if err != nil || tr.Buffered() > 0 || !c.recordBuffered() {
		return n, err
	}
	c.Conn.SetReadDeadline(time.Unix(1, 0))
	defer c.Conn.SetReadDeadline(time.Time{})
	for err == nil && n+maxPlaintext <= len(buf) && c.recordBuffered() {
		var m int
		m, err = t.Read(buf[n:])
		n += m
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = nil
	}
	return n, err
}

// pipe copies both ways between a plaintext socket and a TLS session (tr: its reader past the
// preamble); one side's EOF half-closes the other, an error closes both.
func pipe(plain net.Conn, t *tls.Conn, c *recordConn, tr *bufio.Reader, toTLS, fromTLS *atomic.Int64) {
	var wg sync.WaitGroup
	fail := func() {
		plain.Close()
		t.Close()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		if sealTo(c, t, plain, toTLS) != nil {
			fail()
			return
		}
		t.CloseWrite()
	}()
	go func() {
		defer wg.Done()
		if openTo(c, t, tr, plain, fromTLS) != nil {
			fail()
			return
		}
		if cw, ok := plain.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
	}()
	wg.Wait()
	fail()
}
