// Package helm holds the tests of twill's Helm chart, deploy/helm/twill: the
// chart renders deploy/kube-twill.yaml's objects with its default values, its
// values have the effects they document, and a real kube-apiserver admits
// what it renders. It is a module of its own so that Helm's dependencies stay
// out of twill's go.mod.
package helm
