module orchard/native/tunnel-relay

go 1.19
