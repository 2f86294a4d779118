package main

// ORCHARD_TUNNEL_RELAY_CPUPROFILE=FILE: a pprof CPU profile of this relay until its stdin ends
// (`go tool pprof BINARY FILE`), to see where a relay's CPU goes (bench/README.md, bench:tunnel).

import (
	"fmt"
	"os"
	"runtime/pprof"
)

const profileEnv = "ORCHARD_TUNNEL_RELAY_CPUPROFILE"

// startProfile starts the profile when asked; the function it returns ends it.
func startProfile() func() {
	path := os.Getenv(profileEnv)
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err == nil {
		err = pprof.StartCPUProfile(f)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tunnel-relay: no CPU profile:", err)
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}
