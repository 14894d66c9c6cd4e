package daemon

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"testing"
)

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// The API server's reachability follows the outcome of twilld's requests:
// any answer is up, no answer is down, a request twilld cancelled says
// nothing, and only changes are reported.
func TestReachabilityFollowsRequests(t *testing.T) {
	reach := &reachability{}
	var fail bool
	rt := observed{reach: reach, next: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if fail || r.Context().Err() != nil {
			return nil, errors.New("dial tcp 127.0.0.1:6443: connection refused")
		}
		return &http.Response{StatusCode: http.StatusForbidden, Status: "403 Forbidden"}, nil
	})}
	do := func(ctx context.Context) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://127.0.0.1:6443/api/v1/nodes", nil)
		_, _ = rt.RoundTrip(req)
	}
	var got []bool
	do(context.Background()) // before anyone follows: remembered
	reach.follow(func(up bool, _ string) { got = append(got, up) })
	do(context.Background())
	fail = true
	do(context.Background())
	do(context.Background())
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	fail = false
	do(cancelled)
	do(context.Background())
	if want := []bool{true, false, true}; !slices.Equal(got, want) {
		t.Fatalf("reported %v, want %v", got, want)
	}
}
