// Package ctl implements twillctl's commands. Each command parses its own
// flags (the etcd flags are accepted by every command that talks to etcd, so
// they can follow the command name) and writes to the given streams, which
// keeps the commands testable in-process.
package ctl

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/twillnet/twill/internal/version"
)

type command struct {
	name, args, help string
	run              func(ctx context.Context, args []string, out, errOut io.Writer) error
}

func commands() []command {
	return []command{
		{"config get", "", "print the network config stored in etcd", configGet},
		{"config set", "--file F", "validate F and store it as the network config", configSet},
		{"leases list", "[-o table|json]", "list the leases of the network", leasesList},
		{"leases show", "SUBNET", "show one lease", leasesShow},
		{"leases delete", "SUBNET", "delete a lease (its node acquires one again)", leasesDelete},
		{"status", "[--addr 127.0.0.1:9867]", "summarise the local twilld: readiness, subnet, lease, peers, last reconcile, repairs", status},
		{"lab up", "[--hosts N] [--pods-per-host M] [--backend vxlan|host-gw|alloc|wireguard]", "build the lab: hosts in namespaces, etcd, twilld, pods", labUp},
		{"lab status", "", "show the lab's leases and each host's route/FDB/neighbour counts", labStatus},
		{"lab check", "", "ping every pod from every other pod", labCheck},
		{"lab down", "[--keep-logs]", "remove everything the lab made", labDown},
		{"lab run", "[lab up flags]", "lab up, status, check and down; exit code 0 when every pod reaches every other", labRun},
		{"lab etcd", "--data-dir D --listen HOST:PORT", "(internal) the lab's etcd, embedded in twillctl", labEtcd},
		{"install", "--src F --dst D [--mode 0644]", "copy a file into place atomically (used by the DaemonSet's init containers)", install},
		{"version", "", "print the version", func(_ context.Context, _ []string, out, _ io.Writer) error {
			fmt.Fprintln(out, "twillctl", version.Version)
			return nil
		}},
	}
}

// Main runs the command named by args.
func Main(ctx context.Context, args []string, out, errOut io.Writer) error {
	cmds := commands()
	sort.SliceStable(cmds, func(i, j int) bool { return len(cmds[i].name) > len(cmds[j].name) })
	joined := strings.Join(args, " ") + " "
	for _, c := range cmds {
		if strings.HasPrefix(joined, c.name+" ") {
			return c.run(ctx, args[len(strings.Fields(c.name)):], out, errOut)
		}
	}
	usage(errOut)
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		return flag.ErrHelp
	}
	return fmt.Errorf("unknown command %q", strings.Join(args, " "))
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: twillctl COMMAND [flags]")
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, c := range commands() {
		fmt.Fprintf(tw, "  %s %s\t%s\n", c.name, c.args, c.help)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nRun `twillctl COMMAND -h` for a command's flags.")
}

func newFlagSet(name string, errOut io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("twillctl "+name, flag.ContinueOnError)
	fs.SetOutput(errOut)
	return fs
}

func logger(errOut io.Writer) *slog.Logger {
	if os.Getenv("TWILL_DEBUG") != "" {
		return slog.New(slog.NewTextHandler(errOut, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(errOut, &slog.HandlerOptions{Level: slog.LevelWarn}))
}
