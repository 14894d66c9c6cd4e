package deploy

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strings"
	"testing"
)

// imageTarball is what `make image` writes, from this package's directory.
const imageTarball = "../bin/image/twill.tar"

// The image `make image` builds must hold what deploy/Dockerfile's final
// stage holds: the same files at the same paths, the same ENTRYPOINT and
// PATH; and its programs must run on no base image, so they are static
// executables.
func TestImageMatchesDockerfile(t *testing.T) {
	want, err := parseDockerfile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(imageTarball); err != nil {
		if os.Getenv("TWILL_REQUIRE_ALL") == "1" {
			t.Fatalf("%v; run `make image` (TWILL_REQUIRE_ALL=1: this test must run)", err)
		}
		t.Skipf("%v; run `make image`", err)
	}
	got, err := readImage(imageTarball)
	if err != nil {
		t.Fatal(err)
	}
	for _, tag := range got.tags {
		if repo, _, _ := strings.Cut(tag, "/"); strings.Contains(tag, "/") && (strings.ContainsAny(repo, ".:") || repo == "localhost") {
			t.Errorf("tag %q names a registry host", tag)
		}
	}
	if len(got.tags) != 1 {
		t.Errorf("tags %q, want one", got.tags)
	}
	if !slices.Equal(got.files, want.files) {
		t.Errorf("files of %s:\n  %q\nfiles the Dockerfile's final stage copies:\n  %q", imageTarball, got.files, want.files)
	}
	if !slices.Equal(got.entrypoint, want.entrypoint) {
		t.Errorf("entrypoint %q, the Dockerfile's %q", got.entrypoint, want.entrypoint)
	}
	if got.path != want.path {
		t.Errorf("PATH %q, the Dockerfile's %q", got.path, want.path)
	}
	if len(want.entrypoint) == 0 || !slices.Contains(got.files, want.entrypoint[0]) {
		t.Errorf("the entrypoint %q is not a file of the image", want.entrypoint)
	}
	for _, f := range got.files {
		if got.modes[f]&0o111 != 0o111 {
			t.Errorf("%s: mode %o, not executable by all", f, got.modes[f])
		}
		if err := got.static[f]; err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

type image struct {
	tags       []string
	files      []string // sorted absolute paths of the regular files
	modes      map[string]int64
	static     map[string]error // nil for a static ELF executable
	entrypoint []string
	path       string // PATH in the environment
}

// parseDockerfile reads the files the final stage COPYs (COPY [--flags]
// SRC... DST, in the shell form), its ENTRYPOINT (JSON form) and ENV PATH.
func parseDockerfile(name string) (image, error) {
	var img image
	b, err := os.ReadFile(name)
	if err != nil {
		return img, err
	}
	var lines []string
	for _, l := range strings.Split(strings.ReplaceAll(string(b), "\\\n", " "), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if strings.EqualFold(strings.Fields(l)[0], "FROM") {
			lines = nil // only the final stage counts
		}
		lines = append(lines, l)
	}
	for _, l := range lines {
		instr, rest, _ := strings.Cut(l, " ")
		rest = strings.TrimSpace(rest)
		switch strings.ToUpper(instr) {
		case "COPY", "ADD":
			args := slices.DeleteFunc(strings.Fields(rest), func(a string) bool { return strings.HasPrefix(a, "--") })
			if len(args) < 2 {
				return img, fmt.Errorf("%s: %q: no source or destination", name, l)
			}
			srcs, dst := args[:len(args)-1], args[len(args)-1]
			for _, src := range srcs {
				if len(srcs) > 1 || strings.HasSuffix(dst, "/") {
					img.files = append(img.files, path.Join(dst, path.Base(src)))
				} else {
					img.files = append(img.files, path.Clean(dst))
				}
			}
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(rest), &img.entrypoint); err != nil {
				return img, fmt.Errorf("%s: ENTRYPOINT %s is not in the JSON form: %v", name, rest, err)
			}
		case "ENV":
			if v, ok := strings.CutPrefix(rest, "PATH="); ok {
				img.path = v
			} else if v, ok := strings.CutPrefix(rest, "PATH "); ok {
				img.path = strings.TrimSpace(v)
			}
		}
	}
	slices.Sort(img.files)
	return img, nil
}

// readImage reads a tarball in the format of `docker save`.
func readImage(name string) (image, error) {
	img := image{modes: map[string]int64{}, static: map[string]error{}}
	entries := map[string][]byte{}
	f, err := os.Open(name)
	if err != nil {
		return img, err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return img, err
		}
		if entries[h.Name], err = io.ReadAll(tr); err != nil {
			return img, err
		}
	}
	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(entries["manifest.json"], &manifest); err != nil {
		return img, fmt.Errorf("%s: manifest.json: %v", name, err)
	}
	if len(manifest) != 1 {
		return img, fmt.Errorf("%s: %d images in manifest.json, want 1", name, len(manifest))
	}
	img.tags = manifest[0].RepoTags
	var config struct {
		Config struct {
			Entrypoint []string
			Env        []string
		} `json:"config"`
	}
	if err := json.Unmarshal(entries[manifest[0].Config], &config); err != nil {
		return img, fmt.Errorf("%s: config %s: %v", name, manifest[0].Config, err)
	}
	img.entrypoint = config.Config.Entrypoint
	for _, e := range config.Config.Env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			img.path = v
		}
	}
	dirs := map[string]bool{}
	for _, l := range manifest[0].Layers {
		if err := img.readLayer(entries[l], dirs); err != nil {
			return img, fmt.Errorf("%s: layer %s: %v", name, l, err)
		}
	}
	slices.Sort(img.files)
	// Directories only for the files: anything else is content the
	// Dockerfile does not make.
	for d := range dirs {
		if !slices.ContainsFunc(img.files, func(f string) bool { return strings.HasPrefix(f, d+"/") }) {
			return img, fmt.Errorf("%s: directory %s holds no file", name, d)
		}
	}
	return img, nil
}

func (img *image) readLayer(data []byte, dirs map[string]bool) error {
	var r io.Reader = bytes.NewReader(data)
	if bytes.HasPrefix(data, []byte{0x1f, 0x8b}) {
		zr, err := gzip.NewReader(r)
		if err != nil {
			return err
		}
		r = zr
	}
	tr := tar.NewReader(bufio.NewReader(r))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := path.Join("/", h.Name)
		switch h.Typeflag {
		case tar.TypeDir:
			dirs[p] = true
		case tar.TypeReg:
			if _, dup := img.modes[p]; dup {
				return fmt.Errorf("%s twice", p)
			}
			b, err := io.ReadAll(tr)
			if err != nil {
				return err
			}
			img.files = append(img.files, p)
			img.modes[p] = h.Mode
			img.static[p] = staticELF(b)
		default:
			return fmt.Errorf("%s: entry of type %q; the image holds only files and directories", p, h.Typeflag)
		}
	}
}

// staticELF says why b is not a static executable: no ELF, or one that
// asks for a dynamic loader (PT_INTERP), which the image does not have.
func staticELF(b []byte) error {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return err
	}
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return fmt.Errorf("ELF type %v, not an executable", f.Type)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("dynamically linked (PT_INTERP): build it with CGO_ENABLED=0")
		}
	}
	return nil
}
