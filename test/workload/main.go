// Command workload is the program of the test pods: nothing can be pulled
// here, so `make image` packs this static program as the image
// twill-test/workload (bin/image/twill-test-workload.tar), in place of the
// pause and agnhost images.
//
//	workload serve [-tcp PORT] [-udp PORT]     echo on TCP and UDP
//	workload probe -addr HOST [-tcp PORT] [-udp PORT] [-timeout D] [-whoami]
//	workload sleep                              wait for SIGTERM (no arguments: the same)
//
// serve echoes every line it gets on TCP and every datagram on UDP, except
// "whoami", which it answers with "hostname=H ips=A,B from=C": its host
// name, its addresses (the pod IPs) and the peer's address as it sees it
// (so a test can tell whether the source was rewritten on the way).
//
// probe sends a line over TCP and a datagram over UDP (retried: UDP may
// drop) and expects them back, then exits 0 with "ok ..." or 1 with
// "FAIL ...". Each check is bounded by -timeout.
//
// As PID 1 of a container, a program gets no default signal handling, so
// every mode exits on SIGTERM and SIGINT itself.
package main

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const usage = `usage:
  workload serve [-tcp PORT] [-udp PORT]
  workload probe -addr HOST [-tcp PORT] [-udp PORT] [-timeout D] [-whoami]
  workload sleep
Without arguments, workload sleeps until SIGTERM. "workload MODE -h" lists
the mode's flags.
`

func main() {
	mode, args := "sleep", []string(nil)
	if len(os.Args) > 1 {
		mode, args = os.Args[1], os.Args[2:]
	}
	fs := flag.NewFlagSet("workload "+mode, flag.ExitOnError)
	switch mode {
	case "serve":
		tcp := fs.Int("tcp", 8080, "TCP port to echo on (0: none)")
		udp := fs.Int("udp", 8081, "UDP port to echo on (0: none)")
		fs.Parse(args)
		if err := serve(*tcp, *udp); err != nil {
			fmt.Fprintln(os.Stderr, "workload serve:", err)
			os.Exit(1)
		}
		waitForSignal()
	case "probe":
		addr := fs.String("addr", "", "host to probe (required)")
		tcp := fs.Int("tcp", 8080, "TCP port of the echo server (0: skip TCP)")
		udp := fs.Int("udp", 8081, "UDP port of the echo server (0: skip UDP)")
		timeout := fs.Duration("timeout", 5*time.Second, "time limit of each check")
		whoami := fs.Bool("whoami", false, "also ask the server over TCP who it is, and print the answer")
		fs.Parse(args)
		if *addr == "" {
			fs.Usage()
			os.Exit(2)
		}
		os.Exit(probe(*addr, *tcp, *udp, *timeout, *whoami))
	case "sleep":
		fs.Parse(args)
		waitForSignal()
	case "-h", "-help", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
}

func waitForSignal() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}

// serve starts the echo servers and returns; they run until the process
// exits.
func serve(tcpPort, udpPort int) error {
	if tcpPort != 0 {
		l, err := net.Listen("tcp", ":"+strconv.Itoa(tcpPort))
		if err != nil {
			return err
		}
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					fmt.Fprintln(os.Stderr, "accept:", err)
					time.Sleep(100 * time.Millisecond)
					continue
				}
				go echoTCP(c)
			}
		}()
	}
	if udpPort != 0 {
		c, err := net.ListenPacket("udp", ":"+strconv.Itoa(udpPort))
		if err != nil {
			return err
		}
		go echoUDP(c)
	}
	fmt.Printf("serving: tcp %d, udp %d\n", tcpPort, udpPort)
	return nil
}

func echoTCP(c net.Conn) {
	defer c.Close()
	s := bufio.NewScanner(c)
	for s.Scan() {
		c.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte(reply(s.Text(), c.RemoteAddr()) + "\n")); err != nil {
			return
		}
	}
}

func echoUDP(c net.PacketConn) {
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			fmt.Fprintln(os.Stderr, "udp:", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		c.WriteTo([]byte(reply(string(buf[:n]), from)), from)
	}
}

// reply is the answer to a message: the message, or for "whoami" who
// answers and whom it sees.
func reply(msg string, from net.Addr) string {
	if strings.TrimSpace(msg) != "whoami" {
		return msg
	}
	host, _ := os.Hostname()
	var ips []string
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.IsGlobalUnicast() {
				ips = append(ips, n.IP.String())
			}
		}
	}
	fromIP := from.String()
	if h, _, err := net.SplitHostPort(fromIP); err == nil {
		fromIP = h
	}
	return fmt.Sprintf("hostname=%s ips=%s from=%s", host, strings.Join(ips, ","), fromIP)
}

// probe runs the checks and returns the exit code.
func probe(host string, tcpPort, udpPort int, timeout time.Duration, whoami bool) int {
	code := 0
	check := func(what string, f func() (string, error)) {
		start := time.Now()
		got, err := f()
		if err != nil {
			fmt.Printf("FAIL %s: %v (after %v)\n", what, err, time.Since(start).Round(time.Millisecond))
			code = 1
			return
		}
		fmt.Printf("ok %s: %s in %v\n", what, got, time.Since(start).Round(time.Millisecond))
	}
	if tcpPort != 0 {
		addr := net.JoinHostPort(host, strconv.Itoa(tcpPort))
		check("tcp "+addr, func() (string, error) {
			msg := nonce()
			got, err := askTCP(addr, msg, timeout)
			if err == nil && got != msg {
				err = fmt.Errorf("sent %q, got %q", msg, got)
			}
			return "echo", err
		})
		if whoami {
			check("tcp "+addr+" whoami", func() (string, error) { return askTCP(addr, "whoami", timeout) })
		}
	}
	if udpPort != 0 {
		addr := net.JoinHostPort(host, strconv.Itoa(udpPort))
		check("udp "+addr, func() (string, error) { return "echo", askUDP(addr, timeout) })
	}
	return code
}

func nonce() string {
	b := make([]byte, 8)
	rand.Read(b)
	return "twill-probe-" + hex.EncodeToString(b)
}

func askTCP(addr, msg string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte(msg + "\n")); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("no answer: %w", err)
	}
	return strings.TrimSuffix(line, "\n"), nil
}

// askUDP sends a datagram every 500 ms until its echo comes back or the
// timeout passes.
func askUDP(addr string, timeout time.Duration) error {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	msg := nonce()
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 1500)
	for time.Now().Before(deadline) {
		if _, err := c.Write([]byte(msg)); err != nil {
			return err
		}
		wait := time.Now().Add(500 * time.Millisecond)
		if wait.After(deadline) {
			wait = deadline
		}
		c.SetReadDeadline(wait)
		n, err := c.Read(buf)
		var ne net.Error
		switch {
		case err == nil && string(buf[:n]) == msg:
			return nil
		case err == nil:
			return fmt.Errorf("sent %q, got %q", msg, buf[:n])
		case errors.As(err, &ne) && ne.Timeout():
			continue
		default:
			return err // e.g. connection refused: nothing listens there
		}
	}
	return fmt.Errorf("no echo within %v", timeout)
}
