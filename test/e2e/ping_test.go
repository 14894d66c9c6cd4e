package e2e

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// pinger sends an ICMP echo request from a pod to another every interval
// and records which were answered: the continuous traffic the fault tests
// run through each fault. Its raw socket is made inside the pod's namespace
// and stays there; only echo replies with its own identifier from the target
// count, so several pingers can share a namespace.
type pinger struct {
	t        *testing.T
	conn     net.PacketConn
	to       netip.Addr
	id       uint16
	interval time.Duration

	mu      sync.Mutex
	sent    []time.Time // by sequence number
	answer  map[int]bool
	stop    chan struct{}
	sending sync.WaitGroup
	reading chan struct{}

	haltOnce, closeOnce sync.Once
	halted              time.Time
}

// pingStats is what a pinger saw.
type pingStats struct {
	Sent, Lost int
	// Outage is the longest run of unanswered requests, in time.
	Outage time.Duration
}

func (s pingStats) String() string {
	return fmt.Sprintf("%d sent, %d lost, longest outage %s", s.Sent, s.Lost, s.Outage)
}

// startPing starts pinging to from the namespace fromNS every interval (at
// least 10ms) and waits for the first answer, so that what follows measures
// a path that worked. It stops when the test ends, if not before.
func startPing(t *testing.T, fromNS string, to netip.Addr, interval time.Duration) *pinger {
	t.Helper()
	var conn net.PacketConn
	err := ns.WithNetNSPath("/run/netns/"+fromNS, func(ns.NetNS) error {
		var err error
		conn, err = net.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	})
	if err != nil {
		t.Fatalf("open an ICMP socket in %s: %v", fromNS, err)
	}
	p := &pinger{t: t, conn: conn, to: to, id: uint16(rand.IntN(1 << 16)), interval: max(interval, 10*time.Millisecond),
		answer: map[int]bool{}, stop: make(chan struct{}), reading: make(chan struct{})}
	go p.read()
	p.sending.Add(1)
	go p.send()
	t.Cleanup(func() { p.finish() })
	waitFor(t, fmt.Sprintf("a first echo reply from %s in %s", to, fromNS), 10*time.Second, func() error {
		p.mu.Lock()
		defer p.mu.Unlock()
		if len(p.answer) == 0 {
			return fmt.Errorf("%d requests unanswered", len(p.sent))
		}
		return nil
	})
	return p
}

func (p *pinger) send() {
	defer p.sending.Done()
	tick := time.NewTicker(p.interval)
	defer tick.Stop()
	dst := &net.IPAddr{IP: p.to.AsSlice()}
	for {
		p.mu.Lock()
		seq := len(p.sent)
		p.sent = append(p.sent, time.Now())
		p.mu.Unlock()
		p.conn.WriteTo(echoRequest(p.id, uint16(seq)), dst) // a failed send is a lost request
		select {
		case <-p.stop:
			return
		case <-tick.C:
		}
	}
}

func (p *pinger) read() {
	defer close(p.reading)
	buf := make([]byte, 1500)
	for {
		n, from, err := p.conn.ReadFrom(buf)
		if err != nil {
			return // closed
		}
		// Go strips the IPv4 header of a raw ip4 socket's packets.
		if n < 8 || buf[0] != 0 || buf[1] != 0 || binary.BigEndian.Uint16(buf[4:]) != p.id {
			continue
		}
		if a, ok := netip.AddrFromSlice(from.(*net.IPAddr).IP); !ok || a.Unmap() != p.to {
			continue
		}
		seq := binary.BigEndian.Uint16(buf[6:])
		p.mu.Lock()
		// Sequence numbers wrap after 65536 requests: an answer is to the
		// newest request that carried its number.
		last := len(p.sent) - 1
		if s := last - int(uint16(last)-seq); s >= 0 {
			p.answer[s] = true
		}
		p.mu.Unlock()
	}
}

// halt stops sending; finish collects the figures.
func (p *pinger) halt() {
	p.haltOnce.Do(func() {
		close(p.stop)
		p.sending.Wait()
		p.halted = time.Now()
	})
}

// finish stops sending, gives the last requests two seconds to be answered
// (a loaded machine can be slow to schedule the reader) and returns the
// figures. Calling it again returns the same figures.
func (p *pinger) finish() pingStats {
	p.halt()
	p.closeOnce.Do(func() {
		time.Sleep(time.Until(p.halted.Add(2 * time.Second)))
		p.conn.Close()
		<-p.reading
	})
	p.mu.Lock()
	defer p.mu.Unlock()
	// Requests before the first answer went out before the path was known
	// to work (startPing waits for it); they do not count.
	first := len(p.sent)
	for seq := range p.answer {
		first = min(first, seq)
	}
	st := pingStats{Sent: len(p.sent) - first}
	run := 0
	for seq := first; seq < len(p.sent); seq++ {
		if p.answer[seq] {
			run = 0
			continue
		}
		st.Lost++
		run++
		st.Outage = max(st.Outage, time.Duration(run)*p.interval)
	}
	return st
}

// echoRequest is an ICMP echo request with a 16-byte payload.
func echoRequest(id, seq uint16) []byte {
	b := make([]byte, 8+16)
	b[0] = 8 // echo request
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], "twill-fault-test")
	var sum uint32
	for i := 0; i < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(b[2:], ^uint16(sum))
	return b
}
