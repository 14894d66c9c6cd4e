package lab

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"text/tabwriter"
)

// Matrix is the result of every pod pinging every other pod in one family.
type Matrix struct {
	V6   bool
	Pods []Pod
	OK   map[[2]int]bool // [from, to] index into Pods
}

// Failures counts the pairs that failed.
func (m *Matrix) Failures() int {
	n := 0
	for _, ok := range m.OK {
		if !ok {
			n++
		}
	}
	return n
}

// Check pings from every pod to every other pod's address of one family, a
// few at a time. Each ping is one bounded request to an address inside the
// lab.
func (l *Lab) Check(ctx context.Context, v6 bool) *Matrix {
	if l.isWireGuard() {
		l.wireGuardHandshakes(ctx, v6)
	}
	m := &Matrix{V6: v6, Pods: l.Pods, OK: map[[2]int]bool{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for a := range l.Pods {
		for b := range l.Pods {
			if a == b {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				sem <- struct{}{}
				defer func() { <-sem }()
				ok := Ping(ctx, l.Pods[a].NS, l.Pods[b].AddrOf(v6).String())
				mu.Lock()
				m.OK[[2]int{a, b}] = ok
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	return m
}

// wireGuardHandshakes lets every pair of hosts make its WireGuard session
// from one side before Check pings both ways at once. Two peers that start
// a handshake at the same moment each answer the other's and drop the
// answer to their own, and try again only after WireGuard's REKEY_TIMEOUT
// (5 s, more than Ping waits): the matrix would show a failure that is no
// more than that race. So a pod of each host first pings a pod of each later
// host, a pair at a time, waiting up to 8 s. The outcome is not looked at:
// the matrix says what works.
func (l *Lab) wireGuardHandshakes(ctx context.Context, v6 bool) {
	first := map[int]Pod{}
	for _, p := range l.Pods {
		if _, ok := first[p.Host]; !ok && p.AddrOf(v6).IsValid() {
			first[p.Host] = p
		}
	}
	for i := 1; i <= l.Hosts; i++ {
		for j := i + 1; j <= l.Hosts; j++ {
			from, ok1 := first[i]
			to, ok2 := first[j]
			if ok1 && ok2 {
				InNS(ctx, from.NS, "ping", "-c", "1", "-W", "1", "-w", "8", "-q", to.AddrOf(v6).String())
			}
		}
	}
}

// Ping sends up to three echo requests from a namespace and reports whether
// one was answered.
func Ping(ctx context.Context, netns, addr string) bool {
	_, err := InNS(ctx, netns, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-w", "3", "-q", addr)
	return err == nil
}

// Print writes the matrix as a table: rows ping from, columns are pinged.
func (m *Matrix) Print(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	head := []string{"FROM \\ TO"}
	for _, p := range m.Pods {
		head = append(head, fmt.Sprintf("%s %s", p.Name, p.AddrOf(m.V6)))
	}
	fmt.Fprintln(tw, strings.Join(head, "\t"))
	for a, p := range m.Pods {
		row := []string{fmt.Sprintf("%s %s", p.Name, p.AddrOf(m.V6))}
		for b := range m.Pods {
			switch {
			case a == b:
				row = append(row, "-")
			case m.OK[[2]int{a, b}]:
				row = append(row, "PASS")
			default:
				row = append(row, "FAIL")
			}
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	tw.Flush()
}
