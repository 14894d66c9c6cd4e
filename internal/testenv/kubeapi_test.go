package testenv

import (
	"context"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestKubeAPIScratch(t *testing.T) {
	s := time.Now()
	k := StartKubeAPI(t, KubeAPIOptions{})
	t.Log("start total", time.Since(s))
	cs := k.AdminClient(t)
	ns, err := cs.CoreV1().Namespaces().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Log(len(ns.Items))
	s = time.Now()
	k.Stop(t)
	t.Log("stop", time.Since(s))
	k.Start(t)
	s = time.Now()
	k.Stop(t)
	t.Log("stop", time.Since(s))
}
