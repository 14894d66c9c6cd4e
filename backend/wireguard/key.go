package wireguard

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/twillnet/twill/internal/atomicfile"
)

// DefaultKeyFile holds the node's private key: under /run, so it survives
// restarts of twilld but not a reboot, after which the node makes a new key
// and publishes it in its lease (peers follow within a watch event).
const DefaultKeyFile = "/run/twill/wireguard.key"

// LoadOrCreateKey returns the private key in path, or, when there is no
// such file, makes one and writes it there (mode 0600, in a folder made
// 0700 if missing). A file that cannot be read, is not a key, or can be read
// by others than its owner is an error: the key is never replaced silently,
// since peers know this node by it.
func LoadOrCreateKey(path string) (key wgtypes.Key, created bool, err error) {
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		key, err = wgtypes.GeneratePrivateKey()
		if err != nil {
			return key, false, fmt.Errorf("make a WireGuard private key: %w", err)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return key, false, fmt.Errorf("WireGuard key file: %w", err)
		}
		if err := atomicfile.Write(path, []byte(key.String()+"\n"), 0o600); err != nil {
			return key, false, fmt.Errorf("WireGuard key file: %w", err)
		}
		return key, true, nil
	case err != nil:
		return key, false, fmt.Errorf("WireGuard key file: %w", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return key, false, fmt.Errorf("WireGuard key file: %w", err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return key, false, fmt.Errorf("WireGuard key file %s has mode %04o: others than its owner can read the private key; chmod 600 it (and make a new key if it may have leaked: remove the file and restart twilld)", path, perm)
	}
	key, err = wgtypes.ParseKey(strings.TrimSpace(string(b)))
	if err != nil {
		// The content is a secret, or garbage: the error does not repeat it.
		return key, false, fmt.Errorf("WireGuard key file %s does not hold a WireGuard private key (base64 of 32 bytes, as `wg genkey` prints it); fix it, or remove it to make a new key", path)
	}
	return key, false, nil
}
