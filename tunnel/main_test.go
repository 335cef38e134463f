package tunnel

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain covers both package tunnel and tunnel_test (one test binary).
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
