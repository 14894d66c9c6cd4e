package plugin_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/twillnet/twill/subnet"
)

// TestCNIBadInput runs the built plugin directly, as a runtime would, with
// input that must be refused: the answer is one CNI error object on stdout
// with the right code, exit status 1, and nothing in dataDir. None of these
// cases reach a delegate, so CNI_PATH points at an empty directory and the
// test needs no root.
func TestCNIBadInput(t *testing.T) {
	twill := twillBinary(t)
	good := defaultEnv
	outside := subnet.Env{Network: good.Network, Subnet: netip.MustParsePrefix("10.99.7.1/24"), MTU: 1400, IPMasq: true}

	type tc struct {
		name    string
		command string // default ADD
		stdin   string // %[1]s is the env file, %[2]s the dataDir
		vars    map[string]string
		env     *subnet.Env // written to the env file; nil: no env file
		rawEnv  string      // written verbatim instead, if set
		code    uint
		msg     string // substring of msg+details
	}
	conf := func(version, extra string) string {
		s := fmt.Sprintf(`{"cniVersion":%q,"name":"twill-test","type":"twill","subnetFile":"%%[1]s","dataDir":"%%[2]s"`, version)
		if extra != "" {
			s += "," + extra
		}
		return s + "}"
	}
	cases := []tc{
		{name: "garbage on stdin", stdin: "\x00\x01 this is not JSON", env: &good, code: types.ErrDecodingFailure, msg: "invalid character"},
		{name: "empty stdin", stdin: "", env: &good, code: types.ErrDecodingFailure, msg: "unexpected end of JSON"},
		{name: "JSON array", stdin: "[1,2]", env: &good, code: types.ErrDecodingFailure, msg: "cannot unmarshal array"},
		{name: "missing name", stdin: `{"cniVersion":"1.1.0","type":"twill","dataDir":"%[2]s"}`, env: &good, code: types.ErrInvalidNetworkConfig, msg: "missing network name"},
		{name: "missing cniVersion", stdin: `{"name":"twill-test","type":"twill","subnetFile":"%[1]s","dataDir":"%[2]s"}`, env: &good, code: types.ErrIncompatibleCNIVersion, msg: "0.1.0"},
		{name: "unknown cniVersion", stdin: conf("9.9.9", ""), env: &good, code: types.ErrIncompatibleCNIVersion, msg: "9.9.9"},
		{name: "too old cniVersion", stdin: conf("0.2.0", ""), env: &good, code: types.ErrIncompatibleCNIVersion, msg: "0.2.0"},
		{name: "CHECK at 0.3.1", command: "CHECK", stdin: conf("0.3.1", ""), env: &good, code: types.ErrIncompatibleCNIVersion, msg: "does not allow CHECK"},
		{name: "STATUS at 1.0.0", command: "STATUS", stdin: conf("1.0.0", ""), env: &good, code: types.ErrIncompatibleCNIVersion, msg: "does not allow STATUS"},
		{name: "delegate not an object", stdin: conf("1.1.0", `"delegate":"bridge"`), env: &good, code: types.ErrInvalidNetworkConfig, msg: "delegate must be a JSON object"},
		{name: "delegate sets ipam", stdin: conf("1.1.0", `"delegate":{"ipam":{"type":"dhcp"}}`), env: &good, code: types.ErrInvalidNetworkConfig, msg: `may not set "ipam"`},
		{name: "range outside the node subnet", stdin: conf("1.1.0", `"ipam":{"ranges":[[{"subnet":"10.244.8.0/24"}]]}`), env: &good, code: types.ErrInvalidNetworkConfig, msg: "outside the node subnet"},
		{name: "relative dataDir", stdin: `{"cniVersion":"1.1.0","name":"twill-test","type":"twill","subnetFile":"%[1]s","dataDir":"data"}`, env: &good, code: types.ErrInvalidNetworkConfig, msg: "absolute path"},
		{name: "no env file yet", stdin: conf("1.1.0", ""), code: types.ErrTryAgainLater, msg: "does not exist yet"},
		{name: "env subnet outside its network", stdin: conf("1.1.0", ""), env: &outside, code: types.ErrInvalidNetworkConfig, msg: "lies outside TWILL_NETWORK"},
		{name: "env file garbage", stdin: conf("1.1.0", ""), rawEnv: "\x7fELF\x02\x01", code: types.ErrInvalidNetworkConfig, msg: "not KEY=VALUE"},
		{name: "env file missing MTU", stdin: conf("1.1.0", ""), rawEnv: "TWILL_NETWORK=10.244.0.0/16\nTWILL_SUBNET=10.244.7.1/24\nTWILL_IPMASQ=true\n", code: types.ErrInvalidNetworkConfig, msg: "TWILL_MTU is missing"},
		{name: "env IPv6 subnet /127", stdin: conf("1.1.0", ""), rawEnv: "TWILL_IPV6_NETWORK=fd00:10:244::/48\nTWILL_IPV6_SUBNET=fd00:10:244:7::1/127\nTWILL_MTU=1400\nTWILL_IPMASQ=true\n", code: types.ErrInvalidNetworkConfig, msg: "TWILL_IPV6_SUBNET fd00:10:244:7::1/127 leaves no room for pods"},
		{name: "env IPv6 gateway outside its network", stdin: conf("1.1.0", ""), rawEnv: "TWILL_NETWORK=10.244.0.0/16\nTWILL_SUBNET=10.244.7.1/24\nTWILL_IPV6_NETWORK=fd00:10:244::/48\nTWILL_IPV6_SUBNET=fd00:99:0:7::1/64\nTWILL_MTU=1400\nTWILL_IPMASQ=true\n", code: types.ErrInvalidNetworkConfig, msg: "lies outside TWILL_IPV6_NETWORK"},
		{name: "env IPv6 with an MTU below 1280", stdin: conf("1.1.0", ""), rawEnv: "TWILL_IPV6_NETWORK=fd00:10:244::/48\nTWILL_IPV6_SUBNET=fd00:10:244:7::1/64\nTWILL_MTU=1200\nTWILL_IPMASQ=true\n", code: types.ErrInvalidNetworkConfig, msg: "cannot be used subnet env file: TWILL_MTU 1200 is below 1280"},
		{name: "env IPv6 link-local network", stdin: conf("1.1.0", ""), rawEnv: "TWILL_IPV6_NETWORK=fe80::/10\nTWILL_IPV6_SUBNET=fe80::1/64\nTWILL_MTU=1400\nTWILL_IPMASQ=true\n", code: types.ErrInvalidNetworkConfig, msg: "TWILL_IPV6_NETWORK fe80::/10 is not a unicast network"},
		{name: "STATUS with an MTU below 1280 for IPv6", command: "STATUS", stdin: conf("1.1.0", ""), rawEnv: "TWILL_IPV6_NETWORK=fd00:10:244::/48\nTWILL_IPV6_SUBNET=fd00:10:244:7::1/64\nTWILL_MTU=1200\nTWILL_IPMASQ=true\n", code: types.ErrPluginNotAvailable, msg: "cannot be used"},
		{name: "IPv6 range on an IPv4 node", stdin: conf("1.1.0", `"ipam":{"ranges":[[{"subnet":"fd00:10:244:7::/64"}]]}`), env: &good, code: types.ErrInvalidNetworkConfig, msg: "ipam.ranges[0] is IPv6, but the node has no IPv6 subnet"},
		{name: "IPv4 range set twice", stdin: conf("1.1.0", `"ipam":{"ranges":[[{"rangeStart":"10.244.7.10"}],[{"rangeEnd":"10.244.7.20"}]]}`), code: types.ErrInvalidNetworkConfig, msg: "ipam.ranges[0] and ipam.ranges[1] are both IPv4"},
		{name: "container ID with path", stdin: conf("1.1.0", ""), env: &good, vars: map[string]string{"CNI_CONTAINERID": "../../etc/passwd"}, code: types.ErrInvalidEnvironmentVariables, msg: "invalid characters in containerID"},
		{name: "container ID with slash", stdin: conf("1.1.0", ""), env: &good, vars: map[string]string{"CNI_CONTAINERID": "abc/def"}, code: types.ErrInvalidEnvironmentVariables, msg: "invalid characters"},
		{name: "container ID with dots", stdin: conf("1.1.0", ""), env: &good, vars: map[string]string{"CNI_CONTAINERID": "abc..def"}, code: types.ErrInvalidEnvironmentVariables, msg: `contains ".."`},
		{name: "container ID too long", stdin: conf("1.1.0", ""), env: &good, vars: map[string]string{"CNI_CONTAINERID": strings.Repeat("a", 300)}, code: types.ErrInvalidEnvironmentVariables, msg: "more than 200"},
		{name: "DEL container ID with path", command: "DEL", stdin: conf("1.1.0", ""), env: &good, vars: map[string]string{"CNI_CONTAINERID": "x/../../y"}, code: types.ErrInvalidEnvironmentVariables, msg: "invalid characters"},
		{name: "CHECK container ID with dots", command: "CHECK", stdin: conf("1.1.0", ""), env: &good, vars: map[string]string{"CNI_CONTAINERID": "a..b"}, code: types.ErrInvalidEnvironmentVariables, msg: `contains ".."`},
		{name: "interface name with odd character", stdin: conf("1.1.0", ""), env: &good, vars: map[string]string{"CNI_IFNAME": "eth@0"}, code: types.ErrInvalidEnvironmentVariables, msg: "not allowed"},
		{name: "interface name with slash", stdin: conf("1.1.0", ""), env: &good, vars: map[string]string{"CNI_IFNAME": "../x"}, code: types.ErrInvalidEnvironmentVariables, msg: "interface name"},
		{name: "missing CNI_IFNAME", stdin: conf("1.1.0", ""), env: &good, vars: map[string]string{"CNI_IFNAME": ""}, code: types.ErrInvalidEnvironmentVariables, msg: "CNI_IFNAME"},
		{name: "missing CNI_CONTAINERID", stdin: conf("1.1.0", ""), env: &good, vars: map[string]string{"CNI_CONTAINERID": ""}, code: types.ErrInvalidEnvironmentVariables, msg: "CNI_CONTAINERID"},
		{name: "unknown command", command: "FROB", stdin: conf("1.1.0", ""), env: &good, code: types.ErrInvalidEnvironmentVariables, msg: "unknown CNI_COMMAND"},
		{name: "GC without valid-attachments", command: "GC", stdin: conf("1.1.0", ""), env: &good, code: types.ErrInvalidNetworkConfig, msg: "valid-attachments"},
		{name: "STATUS without env file", command: "STATUS", stdin: conf("1.1.0", ""), code: types.ErrPluginNotAvailable, msg: "does not exist yet"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			envFile := filepath.Join(dir, "subnet.env")
			dataDir := filepath.Join(dir, "data")
			emptyPath := filepath.Join(dir, "no-plugins")
			os.Mkdir(emptyPath, 0o755)
			switch {
			case c.rawEnv != "":
				os.WriteFile(envFile, []byte(c.rawEnv), 0o644)
			case c.env != nil:
				if err := subnet.WriteEnv(envFile, *c.env); err != nil {
					t.Fatal(err)
				}
			}
			command := c.command
			if command == "" {
				command = "ADD"
			}
			vars := map[string]string{
				"CNI_COMMAND":     command,
				"CNI_CONTAINERID": "0123456789abcdef",
				"CNI_NETNS":       filepath.Join(dir, "netns"),
				"CNI_IFNAME":      "eth0",
				"CNI_PATH":        emptyPath,
			}
			for k, v := range c.vars {
				vars[k] = v
			}
			stdin := c.stdin
			if strings.Contains(stdin, "%[") {
				stdin = fmt.Sprintf(stdin, envFile, dataDir)
			}
			cmd := exec.Command(twill)
			cmd.Env = []string{"PATH=/usr/bin:/bin"}
			for k, v := range vars {
				if v != "" {
					cmd.Env = append(cmd.Env, k+"="+v)
				}
			}
			cmd.Stdin = strings.NewReader(stdin)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			var exitErr *exec.ExitError
			if !errors.As(err, &exitErr) || exitErr.ExitCode() != 1 {
				t.Fatalf("exit: %v, want status 1\nstdout: %s\nstderr: %s", err, stdout.Bytes(), stderr.Bytes())
			}
			// stdout is exactly one CNI error object.
			var e types.Error
			dec := json.NewDecoder(&stdout)
			dec.DisallowUnknownFields()
			if err := dec.Decode(&e); err != nil || dec.More() {
				t.Fatalf("stdout is not one CNI error object (%v): %q", err, stdout.String())
			}
			if e.Code != c.code {
				t.Errorf("code %d (%s; %s), want %d", e.Code, e.Msg, e.Details, c.code)
			}
			if e.Msg == "" || !strings.Contains(e.Msg+" "+e.Details, c.msg) {
				t.Errorf("error %q / %q does not mention %q", e.Msg, e.Details, c.msg)
			}
			if _, err := os.Stat(dataDir); !os.IsNotExist(err) {
				entries, _ := os.ReadDir(dataDir)
				t.Errorf("dataDir left behind (%v): %v", err, entries)
			}
		})
	}
}
