package plugin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// groupExec runs each plugin in a process group of its own and, when the
// call's context ends, kills the whole group: the plugin and the delegates
// it runs (bridge, host-local), at whatever point they are. That is what a
// node does to a plugin when the runtime times out and the machine is
// short of memory, or when the runtime itself is killed.
type groupExec struct{ version.PluginDecoder }

func (groupExec) FindInPath(plugin string, paths []string) (string, error) {
	return invoke.FindInPath(plugin, paths)
}

func (groupExec) ExecPlugin(ctx context.Context, path string, stdin []byte, environ []string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, path)
	cmd.Env, cmd.Stdin, cmd.Stdout, cmd.Stderr = environ, bytes.NewReader(stdin), &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("killed: %w", ctx.Err())
		}
		e := &types.Error{}
		if json.Unmarshal(stdout.Bytes(), e) != nil || e.Msg == "" {
			e.Msg = fmt.Sprintf("%v: %s%s", err, stdout.String(), stderr.String())
		}
		return nil, e
	}
	return stdout.Bytes(), nil
}

// 200 pods are added and deleted, 10 at a time, and about half of the ADDs
// have the plugin and its delegates killed at a random moment. The runtime
// answers a failed ADD with a DEL, as the CNI spec asks, except now and then
// when it was killed too and forgets the pod. Throughout, no two live pods
// share an address; at the end a GC that names the surviving pods leaves
// host-local's reservations and twill's state files naming exactly them.
func TestCNIKilledDuringAdd(t *testing.T) {
	const (
		cycles  = 200
		workers = 10
		keep    = workers // the last pod of each worker stays
	)
	n := newNode(t, defaultEnv)
	list := n.confList("1.1.0")
	cni := libcni.NewCNIConfigWithCacheDir(n.path, n.cacheDir, &groupExec{})

	// Kills land anywhere within an ADD: the window follows how long
	// successful ADDs take under this load (an EWMA, from a first guess).
	var addNanos atomic.Int64
	addNanos.Store(int64(100 * time.Millisecond))
	window := func() time.Duration { return max(10*time.Millisecond, time.Duration(addNanos.Load())*5/4) }

	var (
		mu        sync.Mutex
		live      = map[string]string{} // address -> pod
		alive     = map[string]string{} // pod -> address, kept at the end
		forgotten []string
		failures  []string
		killed    atomic.Int32
		reserved  atomic.Int32 // killed after host-local reserved an address
		delRetry  atomic.Int32
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		failures = append(failures, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	run := func(ctx context.Context, f func(context.Context) error) error {
		return n.inHost(func() error { return f(ctx) })
	}
	var next atomic.Int32
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(uint64(w), 7))
			for {
				k := int(next.Add(1)) - 1
				if k >= cycles {
					return
				}
				p := n.newPod(fmt.Sprintf("chaos-%d", k))
				rt := n.rt(p)
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				kill := rnd.IntN(2) == 0
				if kill {
					cancel()
					ctx, cancel = context.WithTimeout(context.Background(), time.Duration(rnd.Int64N(int64(window()))))
				}
				start := time.Now()
				var res types.Result
				err := run(ctx, func(ctx context.Context) (err error) {
					res, err = cni.AddNetworkList(ctx, list, rt)
					return err
				})
				cancel()
				if err != nil {
					if !kill {
						fail("ADD %s: %v", p.id, err)
					}
					killed.Add(1)
					if slices.ContainsFunc(slices.Collect(maps.Values(n.reservations())), func(o string) bool { return strings.HasPrefix(o, p.id+"/") }) {
						reserved.Add(1)
					}
					if rnd.IntN(8) == 0 {
						// The runtime died with it: no DEL, GC will see to it.
						mu.Lock()
						forgotten = append(forgotten, p.id)
						mu.Unlock()
						p.removeNS()
						continue
					}
					delWithRetry(t, n, cni, list, p, &delRetry, fail)
					p.removeNS()
					continue
				}
				took := int64(time.Since(start))
				addNanos.Store((addNanos.Load()*7 + took) / 8)
				addr := resultAddr(res)
				mu.Lock()
				if other, dup := live[addr]; dup || addr == "" {
					failures = append(failures, fmt.Sprintf("%s got %q, which %s holds", p.id, addr, other))
				}
				live[addr] = p.id
				mu.Unlock()
				if k >= cycles-keep {
					mu.Lock()
					alive[p.id] = addr
					mu.Unlock()
					continue
				}
				mu.Lock()
				delete(live, addr)
				mu.Unlock()
				delWithRetry(t, n, cni, list, p, &delRetry, fail)
				p.removeNS()
			}
		}()
	}
	wg.Wait()
	for _, f := range failures {
		t.Error(f)
	}
	t.Logf("%d cycles: %d ADDs killed (%d after host-local had reserved an address), %d never deleted (runtime gone too), %d DELs retried, %d pods kept; an ADD took %s",
		cycles, killed.Load(), reserved.Load(), len(forgotten), delRetry.Load(), len(alive), time.Duration(addNanos.Load()).Round(time.Millisecond))
	if reserved.Load() == 0 {
		t.Error("no kill landed after an address was reserved: the test did not exercise what it is for")
	}
	before := n.reservations()
	t.Logf("before GC host-local holds %d addresses for %d live pods", len(before), len(alive))

	var valid []types.GCAttachment
	for id := range alive {
		valid = append(valid, types.GCAttachment{ContainerID: id, IfName: "eth0"})
	}
	if err := n.inHost(func() error {
		return cni.GCNetworkList(ctx(t), list, &libcni.GCArgs{ValidAttachments: valid})
	}); err != nil {
		t.Fatalf("GC: %v", err)
	}

	var wantState, wantIPs []string
	for id, addr := range alive {
		wantState = append(wantState, netName+"/"+id+"@eth0")
		wantIPs = append(wantIPs, addr+"="+id+"/eth0")
	}
	var gotIPs []string
	for ip, owner := range n.reservations() {
		gotIPs = append(gotIPs, ip+"="+owner)
	}
	sort.Strings(wantState)
	sort.Strings(wantIPs)
	sort.Strings(gotIPs)
	if got := n.stateFiles(); !slices.Equal(got, wantState) {
		t.Errorf("twill's state after GC:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantState, "\n"))
	}
	if !slices.Equal(gotIPs, wantIPs) {
		t.Errorf("host-local's reservations after GC:\n%s\nwant:\n%s", strings.Join(gotIPs, "\n"), strings.Join(wantIPs, "\n"))
	}
}

// delWithRetry DELs a pod as a runtime does: until it succeeds (a few tries).
func delWithRetry(t *testing.T, n *node, cni *libcni.CNIConfig, list *libcni.NetworkConfigList, p *pod, retries *atomic.Int32, fail func(string, ...any)) {
	var err error
	for try := range 3 {
		if try > 0 {
			retries.Add(1)
		}
		err = n.inHost(func() error {
			c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			return cni.DelNetworkList(c, list, n.rt(p))
		})
		if err == nil {
			return
		}
	}
	fail("DEL %s: %v", p.id, err)
}

func resultAddr(r types.Result) string {
	var res struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
	}
	raw, err := json.Marshal(r)
	if err != nil || json.Unmarshal(raw, &res) != nil || len(res.IPs) != 1 {
		return ""
	}
	addr, _, _ := strings.Cut(res.IPs[0].Address, "/")
	return addr
}
