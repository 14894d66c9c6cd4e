package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"github.com/twillnet/twill/internal/atomicfile"
)

// install copies a file into place atomically: the DaemonSet's init
// containers use it to install the CNI plugin and its conflist, so the
// kubelet never reads half a file, and the image needs no shell.
func install(_ context.Context, args []string, out, errOut io.Writer) error {
	fs := newFlagSet("install", errOut)
	src := fs.String("src", "", "file to copy")
	dst := fs.String("dst", "", "where to put it")
	modeStr := fs.String("mode", "0644", "file mode of the copy (octal)")
	if err := parseNoArgs(fs, args); err != nil {
		return err
	}
	if *src == "" || *dst == "" {
		return errors.New("install: --src and --dst are required")
	}
	mode, err := strconv.ParseUint(*modeStr, 8, 32)
	if err != nil || mode > 0o777 {
		return fmt.Errorf("install: --mode %q is not an octal file mode", *modeStr)
	}
	data, err := os.ReadFile(*src)
	if err != nil {
		return fmt.Errorf("install: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(*dst), 0o755); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	if err := atomicfile.Write(*dst, data, os.FileMode(mode)); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	fmt.Fprintf(out, "installed %s as %s (%d bytes, mode %04o)\n", *src, *dst, len(data), mode)
	return nil
}
