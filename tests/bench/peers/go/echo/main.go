// Command echo is the Go peer of bench_echo's servers: a TCP echo server with a goroutine
// per connection running a plain read/write loop (Go's TCP connections have TCP_NODELAY on
// by default, as bench_echo's servers set it).
//
// It prints "listening: HOST:PORT" once it accepts, then serves until killed. Drive it with
// bench_echo --external HOST:PORT [seconds] [rounds].
//
// GOMAXPROCS is 1 unless the environment sets it (bench_echo's servers run on one thread).
//
// Usage: echo [-addr 127.0.0.1:0]
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"runtime"
)

func serve(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on")
	flag.Parse()
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening: %s\n", ln.Addr())
	fmt.Fprintf(os.Stderr, "echo: %s, GOMAXPROCS %d\n", runtime.Version(), runtime.GOMAXPROCS(0))
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Print(err)
			continue
		}
		go serve(c)
	}
}
