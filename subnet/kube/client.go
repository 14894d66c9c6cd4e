package kube

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// NodeClient is what the manager asks of the API server: nodes get, list and
// watch, and nodes/status patch, the verbs twill's ClusterRole grants. Its
// methods are those of client-go's typed NodeInterface, so the Nodes() of a
// kubernetes.Interface (a fake one in tests) is a NodeClient too.
type NodeClient interface {
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Node, error)
	List(ctx context.Context, opts metav1.ListOptions) (*corev1.NodeList, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
	Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, subresources ...string) (*corev1.Node, error)
}

// NewNodeClient returns a NodeClient for the API server of rc.
//
// It is a REST client whose scheme knows Node and NodeList and nothing else,
// rather than client-go's Clientset: the Clientset's package registers every
// type of every API group in its scheme when the program starts and links all
// their typed clients (and the informer factory links every informer), which
// made twilld 2.3 times as large (91 MB against 39) and cost every twilld,
// etcd mode included, about 20 MiB of resident memory. The requests are
// those of the typed client (protobuf preferred, JSON accepted), so the API
// server sees no difference.
func NewNodeClient(rc *rest.Config) (NodeClient, error) {
	scheme := runtime.NewScheme()
	gv := corev1.SchemeGroupVersion
	scheme.AddKnownTypes(gv, &corev1.Node{}, &corev1.NodeList{})
	// Status (errors), WatchEvent and the option types that encode as
	// query parameters.
	metav1.AddToGroupVersion(scheme, gv)

	c := *rc
	c.GroupVersion = &gv
	c.APIPath = "/api"
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc2, err := rest.RESTClientFor(&c)
	if err != nil {
		return nil, fmt.Errorf("Kubernetes REST client for nodes: %w", err)
	}
	return &nodeClient{rest: rc2, params: runtime.NewParameterCodec(scheme)}, nil
}

type nodeClient struct {
	rest   *rest.RESTClient
	params runtime.ParameterCodec
}

func (c *nodeClient) Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Node, error) {
	n := &corev1.Node{}
	err := c.rest.Get().UseProtobufAsDefault().Resource("nodes").Name(name).
		VersionedParams(&opts, c.params).Do(ctx).Into(n)
	return n, err
}

func (c *nodeClient) List(ctx context.Context, opts metav1.ListOptions) (*corev1.NodeList, error) {
	l := &corev1.NodeList{}
	err := c.rest.Get().UseProtobufAsDefault().Resource("nodes").
		VersionedParams(&opts, c.params).Timeout(timeout(opts)).Do(ctx).Into(l)
	return l, err
}

func (c *nodeClient) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	return c.rest.Get().UseProtobufAsDefault().Resource("nodes").
		VersionedParams(&opts, c.params).Timeout(timeout(opts)).Watch(ctx)
}

func (c *nodeClient) Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, subresources ...string) (*corev1.Node, error) {
	n := &corev1.Node{}
	err := c.rest.Patch(pt).UseProtobufAsDefault().Resource("nodes").Name(name).SubResource(subresources...).
		VersionedParams(&opts, c.params).Body(data).Do(ctx).Into(n)
	return n, err
}

func timeout(opts metav1.ListOptions) time.Duration {
	if opts.TimeoutSeconds == nil {
		return 0
	}
	return time.Duration(*opts.TimeoutSeconds) * time.Second
}
