// Package version holds the version of twill's programs, set at link time
// with -ldflags "-X github.com/twillnet/twill/internal/version.Version=...".
package version

// Version is the release this build comes from.
var Version = "dev"
