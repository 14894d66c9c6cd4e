// Command image packs files into a container image with no base (like
// FROM scratch) and writes it in the format of `docker save`, which
// `ctr images import` reads: no Docker, no daemon, no registry. `make image`
// builds twill's image and the test workload's with it.
//
//	image -o OUT.tar -tag NAME:TAG [-entrypoint PATH] [-env K=V]... [-arch GOARCH] SRC=DST...
//
// Each SRC (a file here) becomes DST (an absolute path in the image), with
// its permission bits, owned by root. The layer is reproducible: entries
// sorted, directories for the parents, and every time (the files' and the
// image's creation) is SOURCE_DATE_EPOCH, or 0 when unset; so the same
// files give the same digest.
//
// The tag has no registry host: "twill:v0.1.0" is written as such, and a
// runtime reads it as it reads that name in a pod spec.
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	out := flag.String("o", "", "the image tarball to write (required)")
	tag := flag.String("tag", "", "the image's name, NAME:TAG without a registry host (required)")
	entrypoint := flag.String("entrypoint", "", "the program the image runs")
	arch := flag.String("arch", runtime.GOARCH, "the architecture of the files (GOARCH)")
	var env listFlag
	flag.Var(&env, "env", "K=V of the image's environment (repeatable)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: image -o OUT.tar -tag NAME:TAG [flags] SRC=DST...\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *out == "" || *tag == "" || flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*out, *tag, *entrypoint, *arch, env, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(out, tagName, entrypoint, arch string, env, files []string) error {
	// No default registry: the tag stays "twill:v0.1.0" in manifest.json.
	tag, err := name.NewTag(tagName, name.WithDefaultRegistry(""))
	if err != nil {
		return err
	}
	epoch := time.Unix(0, 0).UTC()
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		sec, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return fmt.Errorf("SOURCE_DATE_EPOCH: %w", err)
		}
		epoch = time.Unix(sec, 0).UTC()
	}
	layerTar, err := layer(files, epoch)
	if err != nil {
		return err
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return err
	}
	cfg := &v1.ConfigFile{
		Architecture: arch,
		OS:           "linux",
		Created:      v1.Time{Time: epoch},
		Config:       v1.Config{Env: env, WorkingDir: "/"},
		RootFS:       v1.RootFS{Type: "layers"},
	}
	if entrypoint != "" {
		cfg.Config.Entrypoint = []string{entrypoint}
	}
	img, err := mutate.ConfigFile(empty.Image, cfg)
	if err != nil {
		return err
	}
	var dsts []string
	for _, f := range files {
		_, dst, _ := strings.Cut(f, "=")
		dsts = append(dsts, dst)
	}
	img, err = mutate.Append(img, mutate.Addendum{Layer: l, History: v1.History{
		Created:   v1.Time{Time: epoch},
		CreatedBy: "hack/tools/image " + strings.Join(dsts, " "),
	}})
	if err != nil {
		return err
	}
	if err := tarball.WriteToFile(out, tag, img); err != nil {
		return err
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	id, err := img.ConfigName()
	if err != nil {
		return err
	}
	fmt.Printf("%s: %s, manifest %s, image ID %s\n", out, tag, digest, id)
	return nil
}

// layer returns the tar of the files (SRC=DST) and their parent
// directories, sorted by path.
func layer(files []string, mtime time.Time) ([]byte, error) {
	type entry struct {
		src string
		hdr *tar.Header
	}
	entries := map[string]entry{}
	for _, f := range files {
		src, dst, ok := strings.Cut(f, "=")
		if !ok || !path.IsAbs(dst) || path.Clean(dst) != dst || dst == "/" {
			return nil, fmt.Errorf("%q is not SRC=DST with DST an absolute path to a file", f)
		}
		fi, err := os.Stat(src)
		if err != nil {
			return nil, err
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("%s is not a regular file", src)
		}
		name := strings.TrimPrefix(dst, "/")
		if _, dup := entries[name]; dup {
			return nil, fmt.Errorf("%s given twice", dst)
		}
		entries[name] = entry{src, &tar.Header{Typeflag: tar.TypeReg, Name: name, Size: fi.Size(), Mode: int64(fi.Mode().Perm())}}
		for dir := path.Dir(name); dir != "."; dir = path.Dir(dir) {
			entries[dir+"/"] = entry{"", &tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755}}
		}
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	slices.Sort(names)
	var buf bytes.Buffer
	w := tar.NewWriter(&buf)
	for _, n := range names {
		e := entries[n]
		e.hdr.ModTime = mtime
		if err := w.WriteHeader(e.hdr); err != nil {
			return nil, err
		}
		if e.src == "" {
			continue
		}
		data, err := os.ReadFile(e.src)
		if err != nil {
			return nil, err
		}
		if int64(len(data)) != e.hdr.Size {
			return nil, fmt.Errorf("%s changed while packing it", e.src)
		}
		if _, err := w.Write(data); err != nil {
			return nil, err
		}
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
