// A small command-line flag parser for blockctl's subcommands: typed flags bound to variables,
// flags anywhere among the positional arguments, generated help.
//
// Each subcommand has its own flag set (plus the global ones), so `blockctl <cmd> --help` lists
// exactly what that command takes. Accepted forms: --name=value, --name value, -name value,
// --flag / --noflag / --flag=false for booleans, and `--` to end the flags. Dashes and underscores
// in names are the same (--max-seq-len is --max_seq_len, --no-progress is --noprogress).
//
//   FlagSet flags("blockctl get BLOCK", "Show one block.");
//   bool json = false;
//   flags.Bool("json", &json, "print the BlockInfo as JSON");
//   std::vector<std::string> args;
//   RETURN_IF_ERROR(flags.Parse(argv_tail, &args));
//   if (flags.help_requested()) std::cout << flags.Help();
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace blockd {

class FlagSet {
 public:
  FlagSet(std::string usage, std::string description);

  void String(const char* name, std::string* value, const char* help);
  void Int(const char* name, int64_t* value, const char* help);
  void Double(const char* name, double* value, const char* help);
  void Bool(const char* name, bool* value, const char* help);
  // "30s", "2m", "500ms", or a plain number of seconds; "inf" or "0" for no limit.
  void Duration(const char* name, absl::Duration* value, const char* help);
  // Starts a new group of flags in the help text ("global flags").
  void Section(const char* title);

  // Sets the bound variables from `args` and returns the other arguments in `positional`.
  // INVALID_ARGUMENT names the flag and what was wrong with it. --help / -h sets help_requested().
  absl::Status Parse(const std::vector<std::string>& args, std::vector<std::string>* positional);
  bool help_requested() const { return help_; }
  // Whether `name` was given on the command line (as opposed to left at its default).
  bool IsSet(const std::string& name) const;
  // True when `name` is a known flag that takes a value (used to skip it while finding the command).
  bool TakesValue(const std::string& name) const;
  std::string Help() const;

 private:
  enum class Type { kString, kInt, kDouble, kBool, kDuration };
  struct Flag {
    std::string name;
    Type type;
    void* value;
    std::string help;
    std::string default_text;
    std::string section;
    bool set = false;
  };
  void Add(const char* name, Type type, void* value, const char* help, std::string default_text);
  static std::string CanonicalName(std::string name);  // '-' -> '_
  Flag* Find(const std::string& name);
  const Flag* Find(const std::string& name) const;
  absl::Status Assign(Flag& f, const std::string& text);

  std::string usage_, description_, section_;
  std::vector<Flag> flags_;
  bool help_ = false;
};

}  // namespace blockd
