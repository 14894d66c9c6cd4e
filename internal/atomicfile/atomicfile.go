// Package atomicfile replaces files so that a reader sees the old content or the
// new, never a torn write, even across a crash.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
)

// Write replaces path with data: a temp file in the same directory is written,
// given mode, synced and renamed over path, and the directory is synced. The
// directory must exist.
func Write(path string, data []byte, mode os.FileMode) error {
	return replace(path, data, mode, true)
}

// Replace is Write without the syncs: readers, and a writer killed half way,
// see the old content or the new, but a crash of the machine may leave the
// file empty or missing. For files whose loss the reader recovers from.
func Replace(path string, data []byte, mode os.FileMode) error {
	return replace(path, data, mode, false)
}

func replace(path string, data []byte, mode os.FileMode, durable bool) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
			err = fmt.Errorf("write %s: %w", path, err)
		}
	}()
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if _, err = f.Write(data); err != nil {
		return err
	}
	if durable {
		if err = f.Sync(); err != nil {
			return err
		}
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	if durable {
		// Sync the directory so the rename itself survives a crash.
		if d, derr := os.Open(filepath.Dir(path)); derr == nil {
			d.Sync()
			d.Close()
		}
	}
	return nil
}
