/* The C ABI from plain C99: version, and an invalid call that must fail cleanly. */
#include <flashlin/flashlin.h>

#include <stdio.h>
#include <string.h>

int main(void) {
  flashlin_recurrence_config config;
  flashlin_recurrence_inputs inputs;
  flashlin_status status;
  memset(&config, 0, sizeof config);
  memset(&inputs, 0, sizeof inputs); /* q, k, v missing: must be rejected, not crash */
  status = flashlin_recurrence_forward(&config, &inputs, NULL, NULL, NULL);
  printf("flashlin %s (C ABI): empty call -> %s: %s\n", flashlin_version(),
         flashlin_status_string(status), flashlin_last_error());
  return status == FLASHLIN_ERROR_INVALID_ARGUMENT ? 0 : 1;
}
