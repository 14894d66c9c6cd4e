package kubeapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// FieldManager names twill's lab and tests as the owner of applied fields.
const FieldManager = "twill-apply"

// Decode splits a multi-document YAML manifest into objects.
func Decode(manifest []byte) ([]*unstructured.Unstructured, error) {
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(manifest), 4096)
	var objs []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return objs, nil
			}
			return nil, fmt.Errorf("decode manifest: %w", err)
		}
		if len(m) == 0 {
			continue
		}
		objs = append(objs, &unstructured.Unstructured{Object: m})
	}
}

// Apply applies every object of a manifest with server-side apply, in order.
// With dryRun the server validates and admits each object without storing
// it; an object in a namespace that the manifest itself creates (and that
// therefore does not exist yet) can only be checked that far, so a "namespace
// not found" answer for it is accepted.
func Apply(ctx context.Context, cfg *rest.Config, manifest []byte, dryRun bool) (applied []string, err error) {
	objs, err := Decode(manifest)
	if err != nil {
		return nil, err
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	created := map[string]bool{}
	for _, o := range objs {
		if o.GetKind() == "Namespace" {
			created[o.GetName()] = true
		}
	}
	opts := metav1.ApplyOptions{FieldManager: FieldManager, Force: true}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return applied, fmt.Errorf("%s %s: %w", gvk.Kind, o.GetName(), err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
		}
		_, err = ri.Apply(ctx, o.GetName(), o, opts)
		if err != nil && dryRun && created[o.GetNamespace()] && apierrors.IsNotFound(err) {
			err = nil
		}
		if err != nil {
			return applied, fmt.Errorf("apply %s %s/%s: %w", gvk.Kind, o.GetNamespace(), o.GetName(), err)
		}
		applied = append(applied, fmt.Sprintf("%s %s", gvk.Kind, o.GetName()))
	}
	return applied, nil
}

// withCodec gives a rest.Config what an unversioned REST client needs.
func withCodec(cfg *rest.Config) *rest.Config {
	c := rest.CopyConfig(cfg)
	c.NegotiatedSerializer = serializer.NewCodecFactory(runtime.NewScheme()).WithoutConversion()
	return c
}

// Without returns the objects of a manifest whose kind is none of kinds, as
// a manifest of JSON documents (e.g. deploy/monitoring.yaml without its
// PodMonitor, on a cluster without the Prometheus Operator).
func Without(manifest []byte, kinds ...string) ([]byte, error) {
	objs, err := Decode(manifest)
	if err != nil {
		return nil, err
	}
	var docs [][]byte
	for _, o := range objs {
		if slices.Contains(kinds, o.GetKind()) {
			continue
		}
		b, err := o.MarshalJSON()
		if err != nil {
			return nil, err
		}
		docs = append(docs, b)
	}
	return bytes.Join(docs, []byte("\n---\n")), nil
}
