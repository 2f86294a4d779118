module orchard/bench/tunnel-relay

go 1.19
