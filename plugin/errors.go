package plugin

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/twillnet/twill/subnet"
)

// Error codes beyond the ones skel returns itself (garbage on stdin: 6, a
// missing network name: 7, an unsupported cniVersion: 1, missing or malformed
// CNI_* variables: 4).
const (
	codeUnknownContainer = types.ErrUnknownContainer            // 3: CHECK without state
	codeBadEnvVars       = types.ErrInvalidEnvironmentVariables // 4: container ID / ifname unusable
	codeIO               = types.ErrIOFailure                   // 5: env or state file unreadable
	codeBadConfig        = types.ErrInvalidNetworkConfig        // 7: plugin config or env file invalid
	codeTryAgain         = types.ErrTryAgainLater               // 11: env file not written yet
	codeNotAvailable     = types.ErrPluginNotAvailable          // 50: STATUS, twilld not ready
	codeInternal         = types.ErrInternal                    // 999
)

// cniError makes the error skel prints: msg says what failed, details why.
func cniError(code uint, msg string, cause error) *types.Error {
	details := ""
	if cause != nil {
		details = cause.Error()
	}
	return types.NewError(code, "twill: "+msg, details)
}

// delegateError keeps the code of a delegate's CNI error, so a runtime sees
// "try again later" from host-local as such, and says which verb failed.
func delegateError(typ, verb string, err error) *types.Error {
	var te *types.Error
	if errors.As(err, &te) {
		return types.NewError(te.Code, fmt.Sprintf("twill: delegate %s %s: %s", typ, verb, te.Msg), te.Details)
	}
	return cniError(codeInternal, fmt.Sprintf("delegate %s %s failed", typ, verb), err)
}

// loadEnv reads the env file and classifies its failures: missing is "try
// again later" (twilld has not written it yet), unreadable is an I/O error,
// malformed is an invalid network configuration.
func loadEnv(path string) (subnet.Env, *types.Error) {
	env, err := subnet.ReadEnv(path)
	if err == nil {
		return env, nil
	}
	if errors.Is(err, fs.ErrNotExist) {
		return env, cniError(codeTryAgain, fmt.Sprintf("subnet env file %s does not exist yet; is twilld running on this node?", path), err)
	}
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return env, cniError(codeIO, fmt.Sprintf("cannot read subnet env file %s", path), err)
	}
	return env, cniError(codeBadConfig, fmt.Sprintf("subnet env file %s is invalid", path), err)
}
