package testenv_test

import (
	"context"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

func whoami(t *testing.T, cs kubernetes.Interface) string {
	t.Helper()
	r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(context.Background(), &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Status.UserInfo.Username
}

// TestKubeAPI: the admin token, a service account token in a kubeconfig, a
// launcher prefix and a dialer, and a restart that keeps certificates and
// tokens valid.
func TestKubeAPI(t *testing.T) {
	var dials atomic.Int64
	api := testenv.StartKubeAPI(t, testenv.KubeAPIOptions{
		Wrap: []string{"env", "TWILL_WRAPPED=1"},
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	})
	admin := api.AdminClient(t)
	if u := whoami(t, admin); u != testenv.AdminUser {
		t.Fatalf("admin is %q", u)
	}
	if dials.Load() == 0 {
		t.Error("the dialer was not used")
	}
	ctx := context.Background()
	if _, err := admin.CoreV1().ServiceAccounts("default").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "probe"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	token := api.ServiceAccountToken(t, "default", "probe")
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := api.Kubeconfig(path, token); err != nil {
		t.Fatal(err)
	}
	fromFile := func() kubernetes.Interface {
		rc, err := clientcmd.BuildConfigFromFlags("", path)
		if err != nil {
			t.Fatal(err)
		}
		cs, err := kubernetes.NewForConfig(rc)
		if err != nil {
			t.Fatal(err)
		}
		return cs
	}
	if u := whoami(t, fromFile()); u != "system:serviceaccount:default:probe" {
		t.Fatalf("kubeconfig user is %q", u)
	}

	api.Stop(t)
	if _, err := admin.CoreV1().Namespaces().List(ctx, metav1.ListOptions{}); err == nil {
		t.Fatal("a stopped server answered")
	}
	api.Start(t)
	// Same serving CA, same token keys: the old kubeconfig still works.
	if u := whoami(t, fromFile()); u != "system:serviceaccount:default:probe" {
		t.Fatalf("after restart the kubeconfig user is %q", u)
	}
}

// TestKubeAPIInNetns runs etcd and the API server inside a network namespace
// through Wrap and reaches them through Dial, as the e2e tests do.
func TestKubeAPIInNetns(t *testing.T) {
	testenv.RequireRoot(t)
	name := "twkapi" + strconv.Itoa(int(time.Now().UnixNano()%1e6))
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	run("netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	run("-n", name, "link", "set", "lo", "up")
	dial := lab.DialInNS(name)
	api := testenv.StartKubeAPI(t, testenv.KubeAPIOptions{
		Wrap: []string{"ip", "netns", "exec", name}, Dial: dial, EtcdProcess: true,
	})
	if u := whoami(t, api.AdminClient(t)); u != testenv.AdminUser {
		t.Fatalf("admin is %q", u)
	}
	// Nothing listens on that port in the test's own namespace.
	if c, err := net.DialTimeout("tcp", api.URL[len("https://"):], time.Second); err == nil {
		c.Close()
		t.Fatalf("the API server at %s is reachable outside its namespace", api.URL)
	}
}
