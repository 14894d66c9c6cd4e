package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"

	"github.com/twillnet/twill/subnet"
)

// twill's API group: the NodeNetwork records of the nodenetwork mode. The
// CustomResourceDefinition is in deploy/kube-twill.yaml.
const (
	GroupName = "twill.io"
	Version   = "v1alpha1"
	// Resource is the NodeNetwork records' resource name.
	Resource = "nodenetworks"
	// KindNodeNetwork is their kind.
	KindNodeNetwork = "NodeNetwork"
)

// SchemeGroupVersion is twill.io/v1alpha1.
var SchemeGroupVersion = schema.GroupVersion{Group: GroupName, Version: Version}

// NodeNetwork is one node's record in the nodenetwork mode: what its peers
// need to reach its pods, written by the node's twilld and named after the
// node. It is cluster-scoped, owned by its Node (an ownerReference, so the
// garbage collector deletes it with the Node), and a twilld may write only
// its own node's (the ValidatingAdmissionPolicy of deploy/kube-twill.yaml).
type NodeNetwork struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              NodeNetworkSpec `json:"spec"`
}

// NodeNetworkSpec is a node's lease: for each family the node has, its pod
// subnet (the Node's podCIDR of that family), the address peers send that
// family's traffic to, and the backend's data for it; the names follow
// flannel's lease (PublicIP, BackendType, BackendData, ...) in the API's
// lowerCamelCase.
type NodeNetworkSpec struct {
	// BackendType is the backend the node runs: vxlan, host-gw, wireguard.
	BackendType string `json:"backendType"`
	// Subnet is the node's IPv4 pod subnet; empty without IPv4.
	Subnet string `json:"subnet,omitempty"`
	// PublicIP is the IPv4 address peers reach the node at (an operator's
	// public-ip-overwrite annotation on the Node wins over twilld's choice).
	PublicIP string `json:"publicIP,omitempty"`
	// BackendData is the backend's IPv4 data, e.g. {"VtepMAC": "..."}.
	BackendData json.RawMessage `json:"backendData,omitempty"`
	// IPv6Subnet, PublicIPv6 and BackendV6Data are the same for IPv6.
	IPv6Subnet    string          `json:"ipv6Subnet,omitempty"`
	PublicIPv6    string          `json:"publicIPv6,omitempty"`
	BackendV6Data json.RawMessage `json:"backendV6Data,omitempty"`
}

// NodeNetworkList is a list of records.
type NodeNetworkList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NodeNetwork `json:"items"`
}

// DeepCopyObject implements runtime.Object.
func (r *NodeNetwork) DeepCopyObject() runtime.Object {
	if r == nil {
		return nil
	}
	c := &NodeNetwork{TypeMeta: r.TypeMeta, Spec: r.Spec}
	r.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	c.Spec.BackendData = cloneRaw(r.Spec.BackendData)
	c.Spec.BackendV6Data = cloneRaw(r.Spec.BackendV6Data)
	return c
}

// DeepCopyObject implements runtime.Object.
func (l *NodeNetworkList) DeepCopyObject() runtime.Object {
	if l == nil {
		return nil
	}
	c := &NodeNetworkList{TypeMeta: l.TypeMeta}
	l.ListMeta.DeepCopyInto(&c.ListMeta)
	if l.Items != nil {
		c.Items = make([]NodeNetwork, len(l.Items))
		for i := range l.Items {
			c.Items[i] = *l.Items[i].DeepCopyObject().(*NodeNetwork)
		}
	}
	return c
}

func cloneRaw(r json.RawMessage) json.RawMessage {
	if r == nil {
		return nil
	}
	return append(json.RawMessage{}, r...)
}

// RecordClient is what the nodenetwork mode asks of the API server about
// records: the verbs twill's ClusterRole grants on nodenetworks.
type RecordClient interface {
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*NodeNetwork, error)
	List(ctx context.Context, opts metav1.ListOptions) (*NodeNetworkList, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
	Create(ctx context.Context, r *NodeNetwork, opts metav1.CreateOptions) (*NodeNetwork, error)
	Update(ctx context.Context, r *NodeNetwork, opts metav1.UpdateOptions) (*NodeNetwork, error)
	Delete(ctx context.Context, name string, opts metav1.DeleteOptions) error
}

// NewRecordClient returns a RecordClient for the API server of rc: a REST
// client of twill.io/v1alpha1 whose scheme knows NodeNetwork alone, in JSON
// (custom resources have no protobuf form).
func NewRecordClient(rc *rest.Config) (RecordClient, error) {
	scheme := runtime.NewScheme()
	gv := SchemeGroupVersion
	scheme.AddKnownTypes(gv, &NodeNetwork{}, &NodeNetworkList{})
	metav1.AddToGroupVersion(scheme, gv)

	c := *rc
	c.GroupVersion = &gv
	c.APIPath = "/apis"
	c.ContentType = runtime.ContentTypeJSON
	c.AcceptContentTypes = runtime.ContentTypeJSON
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc2, err := rest.RESTClientFor(&c)
	if err != nil {
		return nil, fmt.Errorf("Kubernetes REST client for %s: %w", Resource, err)
	}
	return &recordClient{rest: rc2, params: runtime.NewParameterCodec(scheme)}, nil
}

type recordClient struct {
	rest   *rest.RESTClient
	params runtime.ParameterCodec
}

func (c *recordClient) Get(ctx context.Context, name string, opts metav1.GetOptions) (*NodeNetwork, error) {
	r := &NodeNetwork{}
	err := c.rest.Get().Resource(Resource).Name(name).VersionedParams(&opts, c.params).Do(ctx).Into(r)
	return r, err
}

func (c *recordClient) List(ctx context.Context, opts metav1.ListOptions) (*NodeNetworkList, error) {
	l := &NodeNetworkList{}
	err := c.rest.Get().Resource(Resource).VersionedParams(&opts, c.params).Timeout(timeout(opts)).Do(ctx).Into(l)
	return l, err
}

func (c *recordClient) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	return c.rest.Get().Resource(Resource).VersionedParams(&opts, c.params).Timeout(timeout(opts)).Watch(ctx)
}

func (c *recordClient) Create(ctx context.Context, r *NodeNetwork, opts metav1.CreateOptions) (*NodeNetwork, error) {
	out := &NodeNetwork{}
	err := c.rest.Post().Resource(Resource).VersionedParams(&opts, c.params).Body(withKind(r)).Do(ctx).Into(out)
	return out, err
}

func (c *recordClient) Update(ctx context.Context, r *NodeNetwork, opts metav1.UpdateOptions) (*NodeNetwork, error) {
	out := &NodeNetwork{}
	err := c.rest.Put().Resource(Resource).Name(r.Name).VersionedParams(&opts, c.params).Body(withKind(r)).Do(ctx).Into(out)
	return out, err
}

func (c *recordClient) Delete(ctx context.Context, name string, opts metav1.DeleteOptions) error {
	return c.rest.Delete().Resource(Resource).Name(name).Body(&opts).Do(ctx).Error()
}

// withKind returns r as JSON with its apiVersion and kind, which the API
// server requires of a custom resource's body.
func withKind(r *NodeNetwork) []byte {
	c := *r
	c.APIVersion, c.Kind = SchemeGroupVersion.String(), KindNodeNetwork
	b, _ := json.Marshal(&c) // plain strings and valid raw JSON: cannot fail
	return b
}

// recordSpec is the record a node with lease l publishes: its subnets, and
// for each family its public address and backend data.
func recordSpec(l subnet.Lease) NodeNetworkSpec {
	s := NodeNetworkSpec{BackendType: l.Attrs.BackendType}
	if l.Subnet.IsValid() {
		s.Subnet, s.PublicIP, s.BackendData = l.Subnet.String(), l.Attrs.PublicIP.String(), compactJSON(l.Attrs.BackendData)
	}
	if l.IPv6Subnet.IsValid() {
		s.IPv6Subnet, s.PublicIPv6, s.BackendV6Data = l.IPv6Subnet.String(), l.Attrs.PublicIPv6.String(), compactJSON(l.Attrs.BackendV6Data)
	}
	return s
}

// compactJSON is d without insignificant space, as the API server returns
// it; nil for none.
func compactJSON(d json.RawMessage) json.RawMessage {
	if len(d) == 0 || string(d) == "null" {
		return nil
	}
	var b []byte
	if buf, err := json.Marshal(d); err == nil { // json.Marshal compacts a RawMessage
		b = buf
	} else {
		b = d
	}
	return b
}

// sameSpec reports whether two specs publish the same lease.
func sameSpec(a, b NodeNetworkSpec) bool {
	return a.BackendType == b.BackendType && a.Subnet == b.Subnet && a.PublicIP == b.PublicIP &&
		a.IPv6Subnet == b.IPv6Subnet && a.PublicIPv6 == b.PublicIPv6 &&
		string(compactJSON(a.BackendData)) == string(compactJSON(b.BackendData)) &&
		string(compactJSON(a.BackendV6Data)) == string(compactJSON(b.BackendV6Data))
}

// RecordToLease converts a record to the lease it publishes, for the
// families f: each family with a subnet and a public address. ok is false,
// with no error, when the record has no such family of f; an error means
// something in it is malformed (named in the error).
func RecordToLease(r *NodeNetwork) (subnet.Lease, bool, error) {
	return recordLease(r.Name, &r.Spec, bothFamilies)
}

func recordLease(name string, s *NodeNetworkSpec, f families) (subnet.Lease, bool, error) {
	if s.BackendType == "" {
		return subnet.Lease{}, false, fmt.Errorf("record %s: no backendType", name)
	}
	l := subnet.Lease{Attrs: subnet.LeaseAttrs{BackendType: s.BackendType, NodeName: name, PublicIP: netip.IPv4Unspecified()}}
	var err error
	if f.v4 && s.Subnet != "" {
		if l.Subnet, l.Attrs.PublicIP, l.Attrs.BackendData, err = recordFamily(s.Subnet, s.PublicIP, s.BackendData, false); err != nil {
			return subnet.Lease{}, false, fmt.Errorf("record %s: %w", name, err)
		}
	}
	if f.v6 && s.IPv6Subnet != "" {
		if l.IPv6Subnet, l.Attrs.PublicIPv6, l.Attrs.BackendV6Data, err = recordFamily(s.IPv6Subnet, s.PublicIPv6, s.BackendV6Data, true); err != nil {
			return subnet.Lease{}, false, fmt.Errorf("record %s: %w", name, err)
		}
	}
	if !l.Subnet.IsValid() && !l.IPv6Subnet.IsValid() {
		return subnet.Lease{}, false, nil
	}
	return l, true, nil
}

// recordFamily reads one family of a record.
func recordFamily(sn, ip string, data json.RawMessage, v6 bool) (netip.Prefix, netip.Addr, json.RawMessage, error) {
	fam := subnet.FamilyName(v6)
	p, err := netip.ParsePrefix(sn)
	if err != nil || p.Masked() != p || p.Addr().Is6() != v6 || p.Addr().Is4In6() {
		return netip.Prefix{}, netip.Addr{}, nil, fmt.Errorf("%s subnet %q is not an %s network address", fam, sn, fam)
	}
	a, err := parseAddr(ip, v6)
	if err != nil {
		return netip.Prefix{}, netip.Addr{}, nil, fmt.Errorf("%s public address: %w", fam, err)
	}
	d, err := parseBackendData(string(data))
	if err != nil {
		return netip.Prefix{}, netip.Addr{}, nil, fmt.Errorf("%s backend data: %w", fam, err)
	}
	return p, a, d, nil
}
