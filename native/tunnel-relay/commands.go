package main

// Commands on stdin after the config line, one JSON object per line, applied in order (listen
// mode; the agent's EngineTunnels sends them as its state changes):
//   {"register":PORT} / {"unregister":PORT}  an engine of this agent starts / stops; a register
//                       with "socket":PATH names the Unix-domain socket the engine listens on
//   {"revoke":ID}       refuse ID from now on and cut its open sessions
//   {"disconnect":ID}   cut ID's open sessions only
// A command with "ack":N is answered {"ack":N,"sessions":K} once applied (K: sessions cut), so
// the agent can wait until a change is in force; {"ack":N} alone is such a barrier.

import (
	"bufio"
	"encoding/json"
)

type command struct {
	Register   int    `json:"register"`
	Socket     string `json:"socket"`
	Unregister int    `json:"unregister"`
	Revoke     string `json:"revoke"`
	Disconnect string `json:"disconnect"`
	Ack        *int64 `json:"ack"`
}

// commands applies stdin's commands until it ends.
func (r *relay) commands(in *bufio.Reader) {
	for {
		line, err := in.ReadBytes('\n')
		if err != nil {
			return
		}
		var c command
		if json.Unmarshal(line, &c) != nil {
			continue
		}
		cut := r.apply(c)
		if c.Ack != nil {
			r.emit(map[string]int64{"ack": *c.Ack, "sessions": int64(cut)})
		}
	}
}

func (r *relay) apply(c command) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c.Register > 0 {
		r.ports[c.Register] = c.Socket
	}
	if c.Unregister > 0 {
		delete(r.ports, c.Unregister)
	}
	if c.Revoke != "" {
		r.revoked[c.Revoke] = true
	}
	cut := 0
	for _, id := range []string{c.Revoke, c.Disconnect} {
		for conn := range r.byPeer[id] {
			conn.Close() // the raw socket: its pipe fails and closes the engine side
			cut++
		}
		delete(r.byPeer, id) // cut once: the sessions' own release finds nothing left
	}
	return cut
}
