// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status and absl::StatusOr.
//
// Abseil 20220623 ships neither, so they are defined once here for the whole project.
//   RETURN_IF_ERROR(block.Validate());
//   ASSIGN_OR_RETURN(auto info, engine.GetBlock("b0"));
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define BLOCKD_CONCAT_INNER_(a, b) a##b
#define BLOCKD_CONCAT_(a, b) BLOCKD_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                                \
  do {                                                       \
    ::absl::Status blockd_status_ = (expr);                  \
    if (!blockd_status_.ok()) return blockd_status_;         \
  } while (0)

#define BLOCKD_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return std::move(tmp).status();      \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, expr) \
  BLOCKD_ASSIGN_OR_RETURN_IMPL_(BLOCKD_CONCAT_(blockd_statusor_, __COUNTER__), lhs, expr)
