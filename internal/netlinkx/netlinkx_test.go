package netlinkx

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestDump(t *testing.T) {
	boom := errors.New("boom")
	for _, tc := range []struct {
		name        string
		interrupts  int   // calls that report an interrupted dump first
		finalErr    error // what the call after them returns
		wantCalls   int
		wantErr     error
		wantPartial bool
	}{
		{name: "clean", wantCalls: 1},
		{name: "interrupted twice then clean", interrupts: 2, wantCalls: 3},
		{name: "other error is not retried", finalErr: boom, wantCalls: 1, wantErr: boom},
		{name: "interrupted then other error", interrupts: 1, finalErr: unix.EPERM, wantCalls: 2, wantErr: unix.EPERM},
		{name: "always interrupted", interrupts: 1000, wantCalls: MaxDumpAttempts, wantErr: ErrInterrupted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			got, err := Dump(context.Background(), "list things", func() ([]int, error) {
				calls++
				if calls <= tc.interrupts {
					return []int{1}, fmt.Errorf("wrapped: %w", netlink.ErrDumpInterrupted) // partial result
				}
				if tc.finalErr != nil {
					return nil, tc.finalErr
				}
				return []int{1, 2, 3}, nil
			})
			if calls != tc.wantCalls {
				t.Errorf("calls = %d, want %d", calls, tc.wantCalls)
			}
			if tc.wantErr == nil {
				if err != nil || len(got) != 3 {
					t.Fatalf("Dump = %v, %v; want the full result", got, err)
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if got != nil {
				t.Errorf("partial result %v returned with an error", got)
			}
		})
	}
}

func TestDumpInterruptedErrorMatchesNetlink(t *testing.T) {
	_, err := Dump(context.Background(), "x", func() (int, error) { return 0, netlink.ErrDumpInterrupted })
	if !errors.Is(err, netlink.ErrDumpInterrupted) || !errors.Is(err, ErrInterrupted) {
		t.Fatalf("err = %v; want it to match both ErrInterrupted and netlink.ErrDumpInterrupted", err)
	}
}

func TestDumpStopsOnContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	_, err := Dump(ctx, "x", func() (int, error) {
		calls++
		cancel() // the next wait must end at once
		return 0, netlink.ErrDumpInterrupted
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if calls != 1 {
		t.Fatalf("calls = %d after cancel, want 1", calls)
	}
}
