// Command chat is the Go peer of moor-chat (examples/chat/chat.c): the same protocol, written
// the way Go chat servers are written. Each client has a reader goroutine and a writer
// goroutine; a hub goroutine owns the room and is the only one to touch it, so a client's
// lines reach everyone in the order it sent them.
//
//	chat [-b ADDR] [-p PORT]     default 127.0.0.1:7777; -p 0 picks a free port
//
// Protocol (as moor-chat's): "* welcome guest<N>" on connecting, "* <nick> joined" and
// "* <nick> left" to the others, "<nick>: <line>" to everyone but the sender, /nick NAME
// (1-32 of [A-Za-z0-9_-]; "* you are now NAME" to the client, "* OLD is now NAME" to the
// others; "* error: invalid nick", "* error: nick taken"), /who ("* online: " and the nicks,
// sorted), /quit, "* error: unknown command"; a line over 4,096 bytes gets
// "* error: line too long" and the connection is closed. Outboxes are bounded: a client with
// more than 1 MiB unsent is dropped, so a slow reader slows nobody down. SIGINT or SIGTERM
// sends "* server shutting down" to everyone and stops after they had a second to flush.
//
// GOMAXPROCS is 1 unless the environment sets it: the fair single-core comparison with
// moor-chat's one executor. Set GOMAXPROCS in the environment for another (GOMAXPROCS=2 is
// Go's default on a 2-core machine).
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"
)

const (
	maxLine   = 4096    // longest line accepted, without its newline
	maxNick   = 32      //
	outboxMax = 1 << 20 // unsent bytes beyond which a client is dropped
	batch     = 64      // messages per writev
	linger    = time.Second
)

// ---- the outbox: bounded, drained by the client's writer -----------------------------------

type outbox struct {
	mu      sync.Mutex
	msgs    [][]byte // shared with every other outbox the line went to; never written
	bytes   int      // unsent bytes, queued or in the writer's hands
	leaving bool     // the writer sends what is queued, then returns
	wake    chan struct{}
}

// put queues m, or reports false if that would put the outbox over outboxMax.
func (o *outbox) put(m []byte) bool {
	o.mu.Lock()
	if o.bytes+len(m) > outboxMax {
		o.mu.Unlock()
		return false
	}
	o.msgs = append(o.msgs, m)
	o.bytes += len(m)
	o.mu.Unlock()
	select { // one pending wake-up is enough
	case o.wake <- struct{}{}:
	default:
	}
	return true
}

func (o *outbox) leave() {
	o.mu.Lock()
	o.leaving = true
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// ---- a client ----------------------------------------------------------------------------

type client struct {
	conn    net.Conn
	nick    string // the hub's: only the hub reads or writes it
	out     outbox
	dropped bool // the hub's
	written chan struct{}
}

// writer sends up to batch queued lines per system call (net.Buffers: writev).
func (c *client) writer() {
	defer close(c.written)
	var bufs net.Buffers // reused: its backing array outlives each write
	for {
		c.out.mu.Lock()
		for len(c.out.msgs) == 0 && !c.out.leaving {
			c.out.mu.Unlock()
			<-c.out.wake
			c.out.mu.Lock()
		}
		if len(c.out.msgs) == 0 { // leaving, and everything is sent
			c.out.mu.Unlock()
			return
		}
		n := len(c.out.msgs)
		if n > batch {
			n = batch
		}
		bufs = append(bufs[:0], c.out.msgs[:n]...)
		size := 0
		for _, b := range bufs {
			size += len(b)
		}
		c.out.msgs = c.out.msgs[n:]
		if len(c.out.msgs) == 0 {
			c.out.msgs = nil // let a burst's backing array go
		}
		c.out.mu.Unlock()

		unsent := bufs // WriteTo consumes the slice it is called on
		_, err := unsent.WriteTo(c.conn)
		for i := range bufs {
			bufs[i] = nil // sent lines may be freed
		}
		c.out.mu.Lock()
		c.out.bytes -= size
		c.out.mu.Unlock()
		if err != nil { // reset, or closed because dropped
			c.conn.Close()
			return
		}
	}
}

// ---- the hub -----------------------------------------------------------------------------

type eventKind int

const (
	evJoin eventKind = iota
	evLine
	evTooLong
	evLeave
	evShutdown
)

type event struct {
	kind eventKind
	c    *client
	line []byte // evLine: the client's own copy, without "\r\n"
}

type hub struct {
	events  chan event
	clients map[*client]struct{}
	nicks   map[string]*client
	guests  int
	closing bool
}

func (h *hub) deliver(c *client, m []byte) {
	if c.dropped {
		return
	}
	if !c.out.put(m) { // too slow: drop it; its reader sees the closed connection and leaves
		c.dropped = true
		c.conn.Close()
	}
}

func (h *hub) announce(except *client, m []byte) {
	for p := range h.clients {
		if p != except {
			h.deliver(p, m)
		}
	}
}

func line(format string, args ...interface{}) []byte {
	return []byte(fmt.Sprintf(format, args...) + "\n")
}

func validNick(name []byte) bool {
	if len(name) < 1 || len(name) > maxNick {
		return false
	}
	for _, b := range name {
		if !(b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' ||
			b == '_' || b == '-') {
			return false
		}
	}
	return true
}

func (h *hub) command(c *client, l []byte) {
	cmd, arg, hasArg := bytes.Cut(l, []byte{' '})
	switch string(cmd) {
	case "/who":
		nicks := make([]string, 0, len(h.nicks))
		for n := range h.nicks {
			nicks = append(nicks, n)
		}
		sort.Strings(nicks)
		var b bytes.Buffer
		b.WriteString("* online: ")
		for i, n := range nicks {
			if i > 0 {
				b.WriteByte(' ')
			}
			b.WriteString(n)
		}
		b.WriteByte('\n')
		h.deliver(c, b.Bytes())
	case "/nick":
		if !hasArg || !validNick(arg) {
			h.deliver(c, line("* error: invalid nick"))
			return
		}
		name := string(arg)
		if owner := h.nicks[name]; owner != nil && owner != c {
			h.deliver(c, line("* error: nick taken"))
			return
		}
		old := c.nick
		delete(h.nicks, old)
		c.nick = name
		h.nicks[name] = c
		h.deliver(c, line("* you are now %s", name))
		h.announce(c, line("* %s is now %s", old, name))
	default:
		h.deliver(c, line("* error: unknown command"))
	}
}

func (h *hub) run() {
	for ev := range h.events {
		c := ev.c
		switch ev.kind {
		case evJoin:
			for { // guest<N>, N counting connections; a name taken with /nick is skipped
				h.guests++
				c.nick = "guest" + strconv.Itoa(h.guests)
				if h.nicks[c.nick] == nil {
					break
				}
			}
			h.clients[c] = struct{}{}
			h.nicks[c.nick] = c
			h.deliver(c, line("* welcome %s", c.nick))
			h.announce(c, line("* %s joined", c.nick))
		case evLine:
			if _, in := h.clients[c]; !in {
				break
			}
			if ev.line[0] != '/' {
				m := make([]byte, 0, len(c.nick)+2+len(ev.line)+1)
				m = append(append(append(append(m, c.nick...), ": "...), ev.line...), '\n')
				h.announce(c, m)
			} else {
				h.command(c, ev.line)
			}
		case evTooLong:
			h.deliver(c, line("* error: line too long"))
		case evLeave:
			c.out.leave() // after whatever the hub queued for it before
			if _, in := h.clients[c]; !in {
				break
			}
			delete(h.clients, c)
			delete(h.nicks, c.nick)
			if !h.closing {
				h.announce(nil, line("* %s left", c.nick))
			}
		case evShutdown:
			h.closing = true
			h.announce(nil, line("* server shutting down"))
			var written []chan struct{}
			for p := range h.clients {
				p.out.leave()
				written = append(written, p.written)
			}
			go func() { // everyone's writer done, or 2 s
				deadline := time.After(2 * linger)
				for _, w := range written {
					select {
					case <-w:
					case <-deadline:
						os.Exit(0)
					}
				}
				os.Exit(0)
			}()
		}
	}
}

// join registers a new connection's client with the hub, in the order of the accepts, and
// starts its writer.
func (h *hub) join(conn net.Conn) *client {
	c := &client{conn: conn, written: make(chan struct{})}
	c.out.wake = make(chan struct{}, 1)
	go c.writer()
	h.events <- event{kind: evJoin, c: c}
	return c
}

// reader is the rest of a connection's life.
func (h *hub) reader(c *client) {
	conn := c.conn

	r := bufio.NewReaderSize(conn, maxLine+2) // room for "\r\n"
	for {
		l, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) || len(bytes.TrimRight(l, "\r\n")) > maxLine {
			h.events <- event{kind: evTooLong, c: c}
			break
		}
		if err != nil {
			break // EOF, a reset, or dropped
		}
		l = bytes.TrimSuffix(bytes.TrimSuffix(l, []byte{'\n'}), []byte{'\r'})
		if len(l) == 0 {
			continue
		}
		if cmd, _, _ := bytes.Cut(l, []byte{' '}); string(cmd) == "/quit" {
			break
		}
		h.events <- event{kind: evLine, c: c, line: append([]byte(nil), l...)}
	}
	h.events <- event{kind: evLeave, c: c}
	select { // let the writer flush, within linger
	case <-c.written:
	case <-time.After(linger):
	}
	conn.Close()
}

func main() {
	addr := flag.String("b", "127.0.0.1", "address to bind")
	port := flag.Int("p", 7777, "port (0: a free one)")
	flag.Parse()
	if flag.NArg() != 0 || *port < 0 || *port > 65535 {
		fmt.Fprintln(os.Stderr, "usage: chat [-b ADDR] [-p PORT]")
		os.Exit(2)
	}
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(*addr, strconv.Itoa(*port)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "chat: %v\n", err)
		os.Exit(1)
	}
	h := &hub{events: make(chan event, 256), clients: map[*client]struct{}{},
		nicks: map[string]*client{}}
	go h.run()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		ln.Close()
		h.events <- event{kind: evShutdown}
	}()
	fmt.Printf("listening on %s\n", ln.Addr())
	fmt.Fprintf(os.Stderr, "chat: %s, GOMAXPROCS %d\n", runtime.Version(), runtime.GOMAXPROCS(0))
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				select {} // the hub exits the process once everyone had time to flush
			}
			time.Sleep(100 * time.Millisecond) // out of descriptors, say
			continue
		}
		go h.reader(h.join(conn))
	}
}
