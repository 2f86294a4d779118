package main

// Every tunnel session re-checks its peer's certificate (listen.go: authorize; forward.go:
// forwardTLS), resumed sessions included, and a model load opens about a dozen sessions one after
// another, each on the load's critical path. The costly part of those checks is a pure function of
// the certificate bytes and the cluster CA, both fixed for this process: x509 chain building (~0.3
// ms on the bench machine) at the head end, the CA's ECDSA signature (~0.1 ms) at the worker end.
// verifiedCerts remembers which exact certificates passed it and in which time window that answer
// holds; everything else (dates now, role, expected id, revocation) is still checked per session.

import (
	"sync"
	"time"
)

// maxVerified bounds the memory: a cluster has few peers; past this the memo starts afresh.
const maxVerified = 256

type window struct{ from, to time.Time }

type verifiedCerts struct {
	mu   sync.Mutex
	seen map[string]window
}

// check: nil when `der` passed `verify` before and now is inside the window that returned;
// otherwise `verify` runs and a success is remembered.
func (v *verifiedCerts) check(der []byte, now time.Time, verify func() (window, error)) error {
	key := string(der)
	v.mu.Lock()
	w, ok := v.seen[key]
	v.mu.Unlock()
	if ok && !now.Before(w.from) && !now.After(w.to) {
		return nil
	}
	w, err := verify()
	if err != nil {
		return err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.seen == nil || len(v.seen) >= maxVerified {
		v.seen = map[string]window{}
	}
	v.seen[key] = w
	return nil
}
