package dataplane

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

var (
	mac1 = MAC{2, 0, 0, 0, 0, 1}
	mac2 = MAC{2, 0, 0, 0, 0, 2}
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func ip(s string) netip.Addr    { return netip.MustParseAddr(s) }

func state(entries ...any) State {
	s := NewState()
	for _, e := range entries {
		switch e := e.(type) {
		case Route:
			s.Routes[e.Key()] = e
		case foreign:
			s.Foreign[Route(e).Key()] = Route(e)
		case Neigh:
			s.Neighs[e.IP] = e
		case FDB:
			s.FDB[e.Key()] = e
		}
	}
	return s
}

type foreign Route

func TestDiff(t *testing.T) {
	const dev, ext = 7, 2
	peer := pfx("10.244.5.0/24")
	route := Route{Dst: peer, Gw: ip("10.244.5.0"), LinkIndex: dev, Onlink: true, Peer: peer}
	neigh := Neigh{LinkIndex: dev, IP: ip("10.244.5.0"), MAC: mac1, Permanent: true, Peer: peer}
	fdb := FDB{LinkIndex: dev, MAC: mac1, Dst: ip("198.18.0.5"), Peer: peer}
	kernel := func(r Route) Route { r.Peer = netip.Prefix{}; return r } // as read back
	kneigh := func(n Neigh) Neigh { n.Peer = netip.Prefix{}; return n }
	kfdb := func(f FDB) FDB { f.Peer = netip.Prefix{}; return f }

	movedFDB := fdb
	movedFDB.Dst = ip("198.18.0.9")
	newMAC := neigh
	newMAC.MAC = mac2
	newMACFDB := fdb
	newMACFDB.MAC = mac2
	stale := Neigh{LinkIndex: dev, IP: ip("10.244.5.0"), MAC: mac1} // learnt, not permanent
	direct := Route{Dst: peer, Gw: ip("198.18.0.5"), LinkIndex: ext, Peer: peer}
	extraMetric := Route{Dst: peer, Gw: ip("10.244.5.0"), LinkIndex: dev, Onlink: true, Metric: 5}

	for _, tc := range []struct {
		name            string
		desired, actual State
		want            Plan
	}{
		{name: "nothing", desired: state(), actual: state()},
		{name: "cold start", desired: state(route, neigh, fdb), actual: state(),
			want: Plan{SetFDB: []FDB{fdb}, SetNeighs: []Neigh{neigh}, SetRoutes: []Route{route}}},
		{name: "in sync (Peer is not compared)", desired: state(route, neigh, fdb),
			actual: state(kernel(route), kneigh(neigh), kfdb(fdb))},
		{name: "peer gone", desired: state(), actual: state(kernel(route), kneigh(neigh), kfdb(fdb)),
			want: Plan{DelRoutes: []Route{kernel(route)}, DelNeighs: []Neigh{kneigh(neigh)}, DelFDB: []FDB{kfdb(fdb)}}},
		{name: "public IP changed: replace, then remove the old remote", desired: state(route, neigh, movedFDB),
			actual: state(kernel(route), kneigh(neigh), kfdb(fdb)),
			want:   Plan{SetFDB: []FDB{movedFDB}, DelFDB: []FDB{kfdb(fdb)}}},
		{name: "MAC changed", desired: state(route, newMAC, newMACFDB),
			actual: state(kernel(route), kneigh(neigh), kfdb(fdb)),
			want:   Plan{SetFDB: []FDB{newMACFDB}, SetNeighs: []Neigh{newMAC}, DelFDB: []FDB{kfdb(fdb)}}},
		{name: "learnt neighbour becomes permanent", desired: state(neigh), actual: state(stale),
			want: Plan{SetNeighs: []Neigh{neigh}}},
		{name: "route switches to direct routing in place", desired: state(direct), actual: state(kernel(route)),
			want: Plan{SetRoutes: []Route{direct}}},
		{name: "a second route of twill's with another metric goes", desired: state(route),
			actual: state(kernel(route), extraMetric), want: Plan{DelRoutes: []Route{extraMetric}}},
		{name: "foreign route in the way is not replaced", desired: state(route),
			actual: state(foreign{Dst: peer, Gw: ip("198.18.0.254"), LinkIndex: ext}),
			want:   Plan{Blocked: []Route{route}}},
		{name: "foreign route with another metric is no obstacle", desired: state(route),
			actual: state(foreign{Dst: peer, Gw: ip("198.18.0.254"), LinkIndex: ext, Metric: 100}),
			want:   Plan{SetRoutes: []Route{route}}},
		{name: "foreign routes are never deleted", desired: state(),
			actual: state(foreign{Dst: pfx("0.0.0.0/0"), Gw: ip("198.18.0.254"), LinkIndex: ext})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Diff(tc.desired, tc.actual)
			if !reflect.DeepEqual(norm(got), norm(tc.want)) {
				t.Errorf("Diff:\n got %+v\nwant %+v", got, tc.want)
			}
			if got.Len() != norm(tc.want).Len() {
				t.Errorf("Len = %d", got.Len())
			}
		})
	}
}

// norm makes empty and nil slices compare equal.
func norm(p Plan) Plan {
	z := func(v any) bool { return reflect.ValueOf(v).Len() == 0 }
	if z(p.SetFDB) {
		p.SetFDB = nil
	}
	if z(p.SetNeighs) {
		p.SetNeighs = nil
	}
	if z(p.SetRoutes) {
		p.SetRoutes = nil
	}
	if z(p.DelRoutes) {
		p.DelRoutes = nil
	}
	if z(p.DelNeighs) {
		p.DelNeighs = nil
	}
	if z(p.DelFDB) {
		p.DelFDB = nil
	}
	if z(p.Blocked) {
		p.Blocked = nil
	}
	return p
}

func TestDiffIsSorted(t *testing.T) {
	d := NewState()
	for _, s := range []string{"10.244.9.0/24", "10.244.1.0/24", "10.244.5.0/24", "10.10.0.0/16"} {
		r := Route{Dst: pfx(s), Gw: pfx(s).Addr(), LinkIndex: 3}
		d.Routes[r.Key()] = r
	}
	p := Diff(d, NewState())
	var got []string
	for _, r := range p.SetRoutes {
		got = append(got, r.Dst.String())
	}
	if want := "10.10.0.0/16 10.244.1.0/24 10.244.5.0/24 10.244.9.0/24"; strings.Join(got, " ") != want {
		t.Errorf("order %v, want %s", got, want)
	}
}

func TestJoinByPeer(t *testing.T) {
	a, b := pfx("10.244.1.0/24"), pfx("10.244.2.0/24")
	e1, e2, e3, e4 := errors.New("e1"), errors.New("e2"), errors.New("e3"), errors.New("stale")
	err := joinByPeer([]opError{{peer: a, err: e1}, {peer: b, err: e2}, {peer: a, err: e3}, {err: e4}})
	for _, e := range []error{e1, e2, e3, e4} {
		if !errors.Is(err, e) {
			t.Errorf("%v missing from %v", e, err)
		}
	}
	var pe *PeerError
	if !errors.As(err, &pe) {
		t.Fatalf("no PeerError in %v", err)
	}
	msg := err.Error()
	if strings.Count(msg, "peer 10.244.1.0/24") != 1 || !strings.Contains(msg, "peer 10.244.2.0/24") {
		t.Errorf("want one entry per peer, got:\n%s", msg)
	}
	if joinByPeer(nil) != nil {
		t.Error("no failures must give a nil error")
	}
}

func TestMAC(t *testing.T) {
	m, err := ParseMAC("02:AB:00:00:00:01")
	if err != nil || m.String() != "02:ab:00:00:00:01" {
		t.Fatalf("ParseMAC = %v, %v", m, err)
	}
	if _, err := ParseMAC("02:ab:00:00:00:01:02:03"); err == nil {
		t.Error("an 8-byte address must be refused")
	}
	var back MAC
	text, _ := m.MarshalText()
	if err := back.UnmarshalText(text); err != nil || back != m {
		t.Errorf("round trip = %v, %v", back, err)
	}
}

func TestExternalInterfaceValidate(t *testing.T) {
	good := ExternalInterface{Name: "eth0", Index: 2, Addr: ip("198.18.0.1"), Prefix: pfx("198.18.0.0/24"), MTU: 1500}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mod := range map[string]func(*ExternalInterface){
		"no index":         func(e *ExternalInterface) { e.Index = 0 },
		"IPv6":             func(e *ExternalInterface) { e.Addr = ip("2001:db8::1") },
		"no prefix":        func(e *ExternalInterface) { e.Prefix = netip.Prefix{} },
		"addr outside":     func(e *ExternalInterface) { e.Prefix = pfx("198.19.0.0/24") },
		"MTU unknown":      func(e *ExternalInterface) { e.MTU = 0 },
		"unspecified addr": func(e *ExternalInterface) { e.Addr = netip.Addr{} },
	} {
		e := good
		mod(&e)
		if e.Validate() == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
